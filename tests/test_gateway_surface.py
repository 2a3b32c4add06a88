"""End to end over mutual TLS: no RPC outside the guard, no caller holding the server.

Health and reflection are guarded and audited like every other RPC; streams are held to
their limits; one identity's flood leaves another identity served; a trust domain's
identities must chain to that domain's own CA bundle.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.devenv import make_demo_env, start_gateway
from gateway.identity import pki
from tests.conftest import channel_credentials

WAIT = 30.0  # bound on every wait; a test that reaches it has failed


@pytest.fixture(scope="module")
def surface(tmp_path_factory):
    """A gateway with short stream and summary limits, and certificates it must refuse."""
    env = make_demo_env(tmp_path_factory.mktemp("surface"), server={
        "stream_idle_seconds": 1.0, "stream_max_seconds": 4.0,
        "summary_interval_seconds": 1.0, "refusal_rate": 2.0, "refusal_burst": 5})
    ca = pki.load_pair(env.certs / "ca.pem", env.certs / "ca.key")
    odd = {
        "two-uris": pki.issue_client(ca, uris=["spiffe://demo.local/svc/scorer",
                                               "spiffe://demo.local/svc/admin"]),
        "foreign-domain": pki.issue_client(ca, uris=["spiffe://evil.example/svc/scorer"]),
        "cn-only": pki.issue_client(ca, cn="scorer"),
    }
    for name, certified in odd.items():
        certified.write(env.root / f"{name}.pem", env.root / f"{name}.key")
    gw = start_gateway(env)
    yield gw
    gw.stop()


def _channel(gw, identity: str) -> grpc.Channel:
    if identity in ("scorer", "intruder", "auditor", "admin"):
        creds = channel_credentials(gw.env, identity)
    else:
        creds = channel_credentials(gw.env, cert=gw.env.root / f"{identity}.pem",
                                    key=gw.env.root / f"{identity}.key")
    return grpc.secure_channel(gw.target, creds)


def _records(gw) -> list[dict]:
    with _channel(gw, "auditor") as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        size = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=WAIT).size
        entries: list[bytes] = []
        while len(entries) < size:
            got = stub.GetEntries(audit_pb2.GetEntriesRequest(start=len(entries), end=size),
                                  timeout=WAIT).entries
            assert got
            entries.extend(got)
    return [json.loads(e) for e in entries]


def _wait_for_records(gw, predicate) -> list[dict]:
    """The log's records once ``predicate`` holds for them (polled, bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    while True:
        records = _records(gw)
        if predicate(records):
            return records
        assert time.monotonic() < deadline, "the expected audit records never appeared"
        time.sleep(0.2)  # polling the log, not synchronising: the predicate decides


def _health(channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def _list_services(channel) -> tuple[grpc.StatusCode, list[str]]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=WAIT))
    except grpc.RpcError as err:
        return err.code(), []
    return grpc.StatusCode.OK, [s.name for r in responses
                                for s in r.list_services_response.service]


# --- item 1: every RPC passes the guard -----------------------------------------------

@pytest.mark.parametrize("name", ["two-uris", "foreign-domain", "cn-only"])
def test_health_and_reflection_refuse_refused_identities_and_record_it(surface, name):
    with _channel(surface, name) as channel:
        assert _health(channel) == grpc.StatusCode.UNAUTHENTICATED
        assert _list_services(channel)[0] == grpc.StatusCode.UNAUTHENTICATED
    refused = [r for r in _records(surface) if r["kind"] == "decision"
               and r["status"] == "UNAUTHENTICATED" and r["caller"] is None]
    rpcs = {r["rpc"] for r in refused}
    assert {"HealthCheck", "ServerReflectionInfo"} <= rpcs


def test_reflection_is_granted_to_the_admin_only(surface):
    with _channel(surface, "admin") as channel:
        code, services = _list_services(channel)
    assert code == grpc.StatusCode.OK
    assert "inference.GRPCInferenceService" in services
    for identity in ("scorer", "auditor", "intruder"):
        with _channel(surface, identity) as channel:
            assert _list_services(channel)[0] == grpc.StatusCode.PERMISSION_DENIED
    records = [r for r in _records(surface) if r["kind"] == "decision"
               and r["rpc"] == "ServerReflectionInfo" and r["caller"] is not None]
    outcomes = {(r["caller"]["id"].rsplit("/", 1)[-1], r["action"], r["status"])
                for r in records}
    assert ("admin", "reflect", "OK") in outcomes
    assert ("intruder", "reflect", "PERMISSION_DENIED") in outcomes


def test_health_probes_are_recorded_once_per_interval_and_counted(surface):
    with _channel(surface, "scorer") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(40):
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT).status == \
                health_pb2.HealthCheckResponse.SERVING
    scorer = "spiffe://demo.local/svc/scorer"

    def counted(records):
        single = [r for r in records if r["kind"] == "decision" and r["rpc"] == "HealthCheck"
                  and r["caller"] and r["caller"]["id"] == scorer]
        summaries = [r for r in records if r["kind"] == "call_summary"
                     and r["rpc"] == "HealthCheck" and r["caller"]["id"] == scorer]
        return len(single) + sum(s["count"] for s in summaries) >= 40

    records = _wait_for_records(surface, counted)
    single = [r for r in records if r["kind"] == "decision" and r["rpc"] == "HealthCheck"
              and r["caller"] and r["caller"]["id"] == scorer]
    summaries = [r for r in records if r["kind"] == "call_summary"
                 and r["rpc"] == "HealthCheck" and r["caller"]["id"] == scorer]
    # 40 probes in well under the interval's worth of windows: a few records, not forty.
    assert 1 <= len(single) < 10 and summaries
    assert len(single) + sum(s["count"] for s in summaries) == 40
    summary = summaries[0]
    assert summary["reason"] == "summarised" and summary["status"] == "OK"
    assert summary["window"]["end_ms"] >= summary["window"]["start_ms"]
    assert len(summary["caller"]["cert_sha256"]) == 64
