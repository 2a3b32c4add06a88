"""Runtime behaviour of the Monitor: latency degradation, bounded alert queue, threads."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np

from gateway.monitor import InputProfile, Monitor, MonitorSettings


def test_latency_degradation_against_baseline():
    m = Monitor(MonitorSettings(metrics_listen="", latency_window=50, latency_ratio_alarm=3.0,
                                alert_interval_s=0))
    rng = np.random.default_rng(0)

    def window(scale: float) -> None:
        for t in rng.gamma(4.0, scale / 4.0, size=50):
            m.observe_request("clf", "1", "infer", "allow", "OK", {"total": float(t)})

    for _ in range(5):
        window(0.010)
    assert not m.alerts()
    window(0.050)  # five times slower
    (alert,) = m.alerts()
    assert (alert.kind, alert.model) == ("latency", "clf/1")
    assert float(alert.score) > 3.0 and alert.threshold == "3.000000"
    window(0.050)  # still slow: the baseline did not absorb the degradation
    assert [a.kind for a in m.alerts()] == ["latency"]
    # Errors (non-OK) do not count: a fast failure is not a latency baseline.
    for _ in range(200):
        m.observe_request("clf", "1", "infer", "deny", "PERMISSION_DENIED", {"total": 1e-6})
    assert not m.alerts()


_FIRST_MEDIAN = """
import sys
from gateway.monitor._drift import LatencyWatch
watch = LatencyWatch(window=3, alarm_ratio=2.0, max_models=4)
before = set(sys.modules)
ratios = [watch.observe(("m", "1"), s) for s in (0.01, 0.03, 0.02)]
assert ratios[:2] == [None, None] and ratios[2] == 1.0, ratios
print(sorted(set(sys.modules) - before))
"""


def test_the_first_latency_window_imports_nothing_on_the_request_path() -> None:
    """The window's median is np.median's, whose first call imports numpy.ma: that import is
    made when the monitor is, not by the call that closes the first window (an import on a
    handler thread stalls every request). In a fresh interpreter, where nothing is loaded."""
    out = subprocess.run([sys.executable, "-c", _FIRST_MEDIAN], capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_alert_queue_is_bounded_and_drops_are_counted():
    m = Monitor(MonitorSettings(metrics_listen="", max_alerts=2))
    for i in range(5):
        m.score("t/1", None, f"caller-{i}", np.array([[np.nan]]))
    alerts = m.alerts()
    assert [a.caller for a in alerts] == ["caller-3", "caller-4"]  # the newest kept
    assert m.metrics.alerts_dropped._value.get() == 3


def test_scoring_off_gives_neutral_attributes():
    rng = np.random.default_rng(0)
    profile = InputProfile.fit(rng.standard_normal((1000, 3)), seed=0)
    m = Monitor(MonitorSettings(metrics_listen="", scoring=False))
    attrs = m.score("t/1", profile, "alice", np.full((1, 3), 1e6))
    assert attrs["anomaly.input_alarm"] is False and attrs["anomaly.bounds_violation"] is False
    assert not m.alerts()


def test_concurrent_callers_are_consistent():
    rng = np.random.default_rng(0)
    profile = InputProfile.fit(rng.standard_normal((2000, 5)), seed=0)
    m = Monitor(MonitorSettings(metrics_listen="", max_callers=4,
                                quotas={"role:r": {"rate": 0.0, "burst": 150}}))
    rows = rng.standard_normal((400, 5))
    errors: list[BaseException] = []
    rejected = [0] * 8
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(200):
                try:
                    m.admit(f"caller-{t % 4}", ("r",))
                except Exception:
                    rejected[t] += 1
                    continue
                m.score("t/1", profile, f"caller-{t % 4}", rows[i:i + 2])
                m.observe_request("t", "1", "infer", "allow", "OK", {"total": 0.001})
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    # Two threads share each caller's bucket of 150: exactly 400 - 150 rejections each.
    assert sum(rejected) == 4 * (400 - 150)
    total = m.metrics.requests.labels("t", "1", "infer", "allow", "OK")._value.get()
    assert total == 4 * 150
