"""End to end: metrics, health that follows the audit log, quotas, and anomaly-aware policy."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.devenv import make_demo_env, profile_demo_model, run_cli, start_gateway
from tests.conftest import channel_credentials

SCORER = "spiffe://demo.local/svc/scorer"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _request(x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[
        x.astype(np.float32).tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    return request


def _infer(gw, identity: str, x: np.ndarray) -> grpc.StatusCode:
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, identity)) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(x), timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


@pytest.fixture(scope="module")
def quota_gateway(tmp_path_factory):
    env = make_demo_env(tmp_path_factory.mktemp("quota"),
                        monitor={"quotas": {SCORER: {"rate": 0.001, "burst": 3}}})
    gw = start_gateway(env)
    yield gw
    gw.stop()


def test_quota_is_resource_exhausted_exactly_past_the_bucket(quota_gateway):
    x = np.zeros((1, 4))
    codes = [_infer(quota_gateway, "scorer", x) for _ in range(5)]
    assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


def test_metrics_are_scraped_and_count_the_calls(quota_gateway):
    assert _infer(quota_gateway, "intruder", np.zeros((1, 4))) == \
        grpc.StatusCode.PERMISSION_DENIED
    with urllib.request.urlopen(quota_gateway.metrics_url, timeout=10) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["gateway_requests"].samples
                if s.name == "gateway_requests_total"]
    by_outcome = {(s.labels["action"], s.labels["decision"], s.labels["status"]): s.value
                  for s in requests if s.labels["model"] == "demo-mlp"}
    assert by_outcome[("infer", "deny", "PERMISSION_DENIED")] >= 1
    assert by_outcome[("infer", "deny", "RESOURCE_EXHAUSTED")] >= 2
    assert by_outcome[("infer", "allow", "OK")] >= 3
    assert "gateway_request_stage_duration_seconds" in families
    commits = [s for s in families["gateway_audit_fsync_duration_seconds"].samples
               if s.name.endswith("_count")]
    assert commits and commits[0].value >= 1  # every durable commit is timed
    loaded = [s for s in families["gateway_model_loaded"].samples
              if s.labels.get("model") == "demo-mlp"]
    assert loaded and loaded[0].value == 1


class _HealthWatch:
    """The gateway's health status stream (grpc.health.v1 Watch), event by event."""

    def __init__(self, gw) -> None:
        self.statuses: queue.Queue = queue.Queue()
        self._channel = grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer"))
        self._stream = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service=""))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for response in self._stream:
                self.statuses.put(response.status)
        except grpc.RpcError:
            pass

    def wait_for(self, status, timeout: float = 30) -> None:
        while True:
            if self.statuses.get(timeout=timeout) == status:
                return

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()


def test_health_follows_an_unwritable_audit_log_and_nothing_acknowledged_is_lost(tmp_path):
    env = make_demo_env(tmp_path / "gw")
    gw = start_gateway(env)
    watch = _HealthWatch(gw)
    try:
        watch.wait_for(SERVING)
        assert _infer(gw, "scorer", np.zeros((1, 4))) == grpc.StatusCode.OK
        # Immutable even for root: every write to the log now fails.
        subprocess.run(["chattr", "-R", "+i", str(env.audit)], check=True)
        try:
            assert _infer(gw, "scorer", np.zeros((1, 4))) == grpc.StatusCode.UNAVAILABLE
            watch.wait_for(NOT_SERVING)
        finally:
            subprocess.run(["chattr", "-R", "-i", str(env.audit)], check=True)
        assert _infer(gw, "scorer", np.zeros((1, 4))) == grpc.StatusCode.OK
        watch.wait_for(SERVING)
    finally:
        watch.close()
        gw.stop()
    run_cli("audit", "verify", "--config", str(env.config), "--quiet")


@pytest.fixture(scope="module")
def anomaly_gateway(tmp_path_factory):
    """demo-mlp profiled on N(0, 1) data and re-signed; policy denies alarming inputs."""
    root = tmp_path_factory.mktemp("anomaly")
    env = make_demo_env(root)
    profile_demo_model(env, seed=3)
    with open(env.policies / "policy.csv", "a") as f:
        f.write("\n# Sensitive models refuse inputs the profile calls anomalous.\n"
                "p, role:scorers, *, infer, deny, "
                "model.labels.sensitivity == 'high' && anomaly.input_alarm\n")
    gw = start_gateway(env)
    yield gw
    gw.stop()


def test_policy_denies_the_anomalous_input_and_allows_the_normal_one(anomaly_gateway):
    normal = np.random.default_rng(4).normal(0, 1, (1, 4))
    assert _infer(anomaly_gateway, "scorer", normal) == grpc.StatusCode.OK
    probe = np.array([[40.0, -40.0, 40.0, -40.0]])
    assert _infer(anomaly_gateway, "scorer", probe) == grpc.StatusCode.PERMISSION_DENIED
    assert _infer(anomaly_gateway, "scorer", normal) == grpc.StatusCode.OK


def test_background_monitoring_records_alerts_for_probes(tmp_path):
    """No rule needs the scores, so they are computed off the request path; the probes are
    still answered, and still end up as anomaly records in the audit log."""
    env = make_demo_env(tmp_path / "gw")
    profile_demo_model(env, seed=5)
    gw = start_gateway(env)
    try:
        probes = np.random.default_rng(6).uniform(-60, 60, (40, 1, 4))
        assert all(_infer(gw, "scorer", p) == grpc.StatusCode.OK for p in probes)
    finally:
        gw.stop()  # flushes the scoring queue and records its alerts before closing the log
    proc = run_cli("audit", "verify", "--config", str(env.config), "--json", "--quiet")
    assert json.loads(proc.stdout)["ok"] is True
    records = [json.loads(line) for path in sorted((env.audit / "segments").iterdir())
               for line in path.read_bytes().rstrip(b"\0").splitlines() if line.strip()]
    alerts = [r for r in records if r["kind"] == "anomaly"]
    assert {"input", "bounds"} & {a["alert"] for a in alerts}, alerts
    assert all(a["caller"] == SCORER for a in alerts if a["alert"] in ("input", "bounds"))
