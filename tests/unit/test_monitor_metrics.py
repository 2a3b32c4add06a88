"""Metrics served over real HTTP on an ephemeral port, parsed with prometheus-client's parser;
and `gateway monitor --once` reading them."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.monitor import InputProfile, Monitor, MonitorSettings

ALICE = "spiffe://demo.local/alice"


def scrape(monitor: Monitor) -> dict[str, list]:
    host, port = monitor.http_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples, name, **labels) -> float:
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == w for k, w in labels.items()):
            return v
    raise AssertionError(f"no sample {name} {labels}")


@pytest.fixture
def monitor():
    m = Monitor(MonitorSettings(metrics_listen="127.0.0.1:0",
                                quotas={ALICE: {"rate": 0.0, "burst": 3}}))
    m.start_http()
    yield m
    m.stop_http()


def test_metrics_exposition(monitor):
    rng = np.random.default_rng(0)
    profile = InputProfile.fit(rng.standard_normal((2000, 4)), seed=0)
    for _ in range(3):
        monitor.admit(ALICE, ())
    with pytest.raises(Exception, match="quota exceeded"):
        monitor.admit(ALICE, ())
    monitor.score("iris/1", profile, ALICE, rng.standard_normal((2, 4)))
    monitor.score("iris/1", profile, ALICE, np.full((1, 4), 50.0))  # bounds violation
    monitor.observe_request("iris", "1", "infer", "allow", "OK",
                            {"decision": 0.0002, "inference": 0.001, "audit": 0.003,
                             "total": 0.005})
    monitor.observe_request("iris", "1", "infer", "deny", "PERMISSION_DENIED",
                            {"decision": 0.0002, "total": 0.001})
    monitor.set_policy("sha256:abc", True)
    monitor.set_policy("sha256:def", True)
    monitor.set_policy("sha256:bad", False)
    monitor.set_audit(42, 7.5)
    monitor.observe_audit_commit(0.002, 3)
    monitor.set_model_state("iris", "1", loaded=True, signature_ok=True)

    s = scrape(monitor)
    assert value(s, "gateway_requests_total", model="iris", decision="allow", status="OK") == 1
    assert value(s, "gateway_requests_total", decision="deny",
                 status="PERMISSION_DENIED") == 1
    assert value(s, "gateway_request_stage_duration_seconds_count", stage="total") == 2
    assert value(s, "gateway_request_stage_duration_seconds_count", stage="inference") == 1
    # Only the policy in force carries its digest; the failed reload is counted.
    assert [lab["digest"] for lab, _ in s["gateway_policy_info"]] == ["sha256:def"]
    assert value(s, "gateway_policy_reloads_total", outcome="failure") == 1
    assert value(s, "gateway_policy_reloads_total", outcome="success") == 2
    assert value(s, "gateway_policy_last_reload_success") == 0
    assert value(s, "gateway_audit_log_entries") == 42
    assert value(s, "gateway_audit_checkpoint_age_seconds") == 7.5
    assert value(s, "gateway_audit_fsync_duration_seconds_count") == 1
    assert value(s, "gateway_model_loaded", model="iris", version="1") == 1
    assert value(s, "gateway_model_signature_valid", model="iris", version="1") == 1
    assert value(s, "gateway_caller_requests_total", caller=ALICE, outcome="admitted") == 3
    assert value(s, "gateway_caller_requests_total", caller=ALICE, outcome="rejected") == 1
    assert value(s, "gateway_anomaly_input_score_ratio_count", model="iris/1") == 2
    assert value(s, "gateway_anomaly_detections_total", kind="bounds", model="iris/1") == 1
    assert value(s, "gateway_anomaly_alerts_total", kind="quota", model="") == 1
    assert value(s, "gateway_caller_extraction_alarm", caller=ALICE) == 0


def test_only_metrics_path_is_served_and_monitors_are_independent(monitor):
    host, port = monitor.http_address
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{host}:{port}/other", timeout=5)
    assert err.value.code == 404
    other = Monitor(MonitorSettings(metrics_listen="127.0.0.1:0"))
    other.start_http()
    try:
        monitor.observe_request("a", "1", "infer", "allow", "OK", {"total": 0.01})
        assert "gateway_requests_total" in scrape(monitor)
        assert "gateway_requests_total" not in scrape(other)  # own registry
    finally:
        other.stop_http()


def test_listener_errors_are_config_errors(monitor):
    host, port = monitor.http_address
    clash = Monitor(MonitorSettings(metrics_listen=f"{host}:{port}"))
    with pytest.raises(ConfigError, match="cannot listen"):
        clash.start_http()
    assert Monitor(MonitorSettings(metrics_listen="")).start_http() is None


def test_caller_series_are_bounded_by_the_lru(monitor):
    m = Monitor(MonitorSettings(metrics_listen="127.0.0.1:0", max_callers=3))
    m.start_http()
    try:
        for i in range(10):
            m.score("t/1", None, f"caller-{i}", [[0.0]])
        callers = {lab["caller"] for lab, _ in scrape(m)["gateway_caller_rate_ratio"]}
        assert callers == {"caller-7", "caller-8", "caller-9"}
    finally:
        m.stop_http()


def test_gateway_monitor_once(monitor, capsys):
    monitor.admit(ALICE)
    monitor.observe_request("iris", "1", "infer", "allow", "OK",
                            {"decision": 0.001, "total": 0.004})
    monitor.set_policy("sha256:0123456789abcdef0123", True)
    host, port = monitor.http_address
    assert main(["monitor", "--once", "--url", f"http://{host}:{port}/metrics"]) == 0
    out = capsys.readouterr().out
    assert "policy sha256:0123456789" in out
    assert "iris/1" in out and ALICE in out
    line = next(x for x in out.splitlines() if x.startswith("iris/1"))
    assert line.split()[1:4] == ["1", "1", "0"]  # requests, allowed, denied


def test_gateway_monitor_unreachable_is_a_clear_error(capsys):
    assert main(["monitor", "--once", "--url", "http://127.0.0.1:9/metrics"]) == 2
    err = capsys.readouterr().err
    assert "cannot read metrics from http://127.0.0.1:9/metrics" in err
    assert "Traceback" not in err
    assert main(["monitor", "--once", "--url", "file:///etc/passwd"]) == 2
    assert "expected an http://" in capsys.readouterr().err
