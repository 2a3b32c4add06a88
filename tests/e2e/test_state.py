"""gateway.state: exact local buckets, the host hub (leased buckets shared by processes, the
coordinator, usage handed to the hub) and failing closed when the hub is gone."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.errors import ConfigError, StateUnavailable
from gateway.monitor import InputProfile, Monitor, MonitorSettings
from gateway.state import (
    Applied,
    LocalBuckets,
    StateServer,
    StateSettings,
    Usage,
    local_state,
    open_state,
)
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _wait(predicate, what: str, deadline: float = 20.0) -> None:
    """The shared wait (tests/support/waiting.py), in this file's argument order."""
    wait_for(what, predicate, deadline)


def _host(sock: Path, member: str, **kw) -> object:
    return open_state(StateSettings(backend="host", socket=sock, **kw), member=member)


# --------------------------------------------------------------------------- local


def test_local_buckets_are_exact_refill_cap_give_back_and_rule_change():
    clock = Clock()
    b = LocalBuckets(clock=clock)
    assert [b.take("k", 2.0, 3) for _ in range(4)] == [True, True, True, False]
    clock.now += 0.49  # 0.98 of a token
    assert not b.take("k", 2.0, 3)
    clock.now += 0.01 + 1e-9
    assert b.take("k", 2.0, 3) and not b.take("k", 2.0, 3)
    b.give_back("k", 2.0, 3, 2)
    assert b.available("k", 2.0, 3) == pytest.approx(2.0)
    assert not b.take("k", 2.0, 3, n=3)  # not enough: nothing taken
    assert b.available("k", 2.0, 3) == pytest.approx(2.0)
    clock.now += 100
    assert b.available("k", 2.0, 3) == 3.0  # capped at the burst
    assert not b.take("k", 1.0, 5, n=4)  # a changed rule keeps the 3 tokens: no refill
    assert b.take("k", 1.0, 5, n=3)
    assert b.available("k", 1.0, 2) == 0.0
    assert b.lease("other", 0.0, 10, need=4, want=8) == (8, 2.0)
    assert b.lease("other", 0.0, 10, need=4, want=8) == (0, 2.0)  # fewer than needed: none


def test_local_coordinator_applies_here_and_replays_to_a_late_subscriber():
    state = local_state("solo")
    seen: list[tuple[str, dict]] = []
    state.coordinator.subscribe("models", lambda k, p: seen.append((k, dict(p))) or None)
    assert state.coordinator.apply_everywhere("models", "m/1", {"op": "load"}, 1.0) == [
        Applied("solo", True, "")]
    late: list[str] = []
    state.coordinator.subscribe("models", lambda k, p: late.append(k) or "refused")
    assert late == ["m/1"]
    answers = state.coordinator.apply_everywhere("models", "m/2", {"op": "load"}, 1.0)
    assert [(a.ok, a.detail) for a in answers] == [(True, ""), (False, "refused")]


def test_state_settings_are_validated():
    with pytest.raises(ConfigError, match="backend"):
        StateSettings(backend="redis")
    with pytest.raises(ConfigError, match="lease_tokens"):
        StateSettings(lease_tokens=0)


# --------------------------------------------------------------------------- host hub

_HUB = """
import signal, sys
from pathlib import Path
from gateway.state import StateServer
server = StateServer(Path(sys.argv[1]))
server.start()
print("ready", flush=True)
signal.sigwait({signal.SIGTERM})
server.stop()
"""

_TAKER = """
import json, sys, time
from pathlib import Path
from gateway.errors import StateUnavailable
from gateway.state import StateSettings, open_state
sock, member, go, seconds = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
state = open_state(StateSettings(backend="host", socket=sock, lease_tokens=4,
                                 lease_seconds=0.2), member=member)
give_up = time.monotonic() + 60
while not go.exists() and time.monotonic() < give_up:
    time.sleep(0.001)
admitted = refused = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    if state.buckets.take("quota:spiffe://d/alice", 20.0, 40):
        admitted += 1
    else:
        refused += 1
state.close()
print(json.dumps({"admitted": admitted, "refused": refused}), flush=True)
"""


def _start_hub(sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HUB, str(sock)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def hub(tmp_path):
    sock = tmp_path / "run" / "state.sock"
    proc = _start_hub(sock)
    yield sock, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_hub_socket_is_private(hub):
    sock, _ = hub
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


def test_two_processes_share_one_quota_within_the_documented_bound(hub, tmp_path):
    """Rate 20/s, burst 40, two worker processes taking as fast as they can for 1.5 s: all
    of them together never admit more than burst + rate * t (one bucket, not one each: two
    separate buckets would admit about twice that)."""
    sock, _ = hub
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _TAKER, str(sock), f"w{i}", str(go),
                               "1.5"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]
    t0 = time.monotonic()
    go.touch()
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    elapsed = time.monotonic() - t0
    admitted = sum(r["admitted"] for r in results)
    bound = 40 + 20.0 * elapsed
    print(f"admitted {admitted} of at most {bound:.0f} ({results}, {elapsed:.2f} s)")
    assert admitted <= bound
    assert admitted >= 40  # the burst itself is never refused
    assert all(r["admitted"] > 0 and r["refused"] > 0 for r in results)


def test_leases_go_back_so_another_member_is_not_refused_for_long(hub):
    sock, _ = hub
    a = _host(sock, "a", lease_tokens=8, lease_seconds=0.2)
    b = _host(sock, "b", lease_tokens=8, lease_seconds=0.2)
    try:
        assert a.buckets.take("k", 0.0, 10)  # a leases 8 of 10 and spends 1
        assert b.buckets.take("k", 0.0, 10, n=2)  # the 2 left
        assert not b.buckets.take("k", 0.0, 10)  # 7 idle in a: an early refusal (bound)
        _wait(lambda: b.buckets.take("k", 0.0, 10), "a's unspent lease to go back")
        admitted = 1 + sum(b.buckets.take("k", 0.0, 10) for _ in range(20))
        assert admitted == 7  # exactly what a held, nothing more: no refill at rate 0
    finally:
        a.close()
        b.close()


def test_hub_killed_quota_checks_fail_closed_then_recover(hub):
    sock, proc = hub
    state = _host(sock, "w0", lease_tokens=4, timeout_seconds=1.0)
    try:
        assert state.buckets.take("k", 100.0, 100)
        proc.kill()
        proc.wait(timeout=10)
        outcomes = []
        for _ in range(6):  # at most the 3 tokens still leased, then the hub is needed
            try:
                outcomes.append(state.buckets.take("k", 100.0, 100))
            except StateUnavailable as err:
                outcomes.append(err)
                break
        assert isinstance(outcomes[-1], StateUnavailable), outcomes
        assert outcomes[-1].status == grpc.StatusCode.UNAVAILABLE
        assert len(outcomes) <= 4
        with pytest.raises(StateUnavailable):  # still down: still closed, never an allow
            state.buckets.take("k", 100.0, 100)
        restarted = _start_hub(sock)
        try:
            assert state.buckets.take("k", 100.0, 100)  # reconnects by itself
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(timeout=10)
    finally:
        state.close()


def test_coordinator_applies_everywhere_names_the_silent_member_and_replays(hub):
    sock, _ = hub
    a, b = _host(sock, "w-a"), _host(sock, "w-b")
    applied: dict[str, list[str]] = {"w-a": [], "w-b": [], "w-c": []}
    release = threading.Event()

    def handler(member: str):
        def apply(key: str, payload) -> str | None:
            if payload.get("op") == "hang" and member == "w-b":
                release.wait(10)
            if payload.get("op") == "bad" and member == "w-a":
                return "signature does not verify"
            applied[member].append(key)
            return None
        return apply

    late = None
    try:
        a.coordinator.subscribe("models", handler("w-a"))
        b.coordinator.subscribe("models", handler("w-b"))
        answers = b.coordinator.apply_everywhere("models", "iris/1", {"op": "load"}, 5.0)
        assert answers == [Applied("w-a", True, ""), Applied("w-b", True, "")]
        assert applied["w-a"] == applied["w-b"] == ["iris/1"]
        answers = a.coordinator.apply_everywhere("models", "iris/2", {"op": "bad"}, 5.0)
        assert answers == [Applied("w-a", False, "signature does not verify"),
                           Applied("w-b", True, "")]
        answers = a.coordinator.apply_everywhere("models", "iris/3", {"op": "hang"}, 0.5)
        assert answers[0] == Applied("w-a", True, "")
        assert answers[1].member == "w-b" and not answers[1].ok
        assert "no answer within 0.5 s" in answers[1].detail
        release.set()
        late = _host(sock, "w-c")
        late.coordinator.subscribe("models", handler("w-c"))  # replays the desired state
        assert sorted(applied["w-c"]) == ["iris/1", "iris/2", "iris/3"]
    finally:
        release.set()
        for s in (a, b, late):
            if s is not None:
                s.close()


def test_coordinator_without_the_hub_is_unavailable(tmp_path):
    state = _host(tmp_path / "none" / "state.sock", "w0", timeout_seconds=0.5)
    with pytest.raises(StateUnavailable):
        state.coordinator.apply_everywhere("models", "m/1", {"op": "load"}, 1.0)
    with pytest.raises(StateUnavailable):
        state.coordinator.subscribe("models", lambda k, p: None)
    state.close()


def test_workers_hand_usage_to_the_hub_which_scores_every_workers_traffic(tmp_path):
    """Two workers' monitors queue background scoring; the hub's monitor gets both, with the
    arrays, predictions and profile intact, and its detectors raise the alerts."""
    sock = tmp_path / "run" / "state.sock"
    hub_monitor = Monitor(MonitorSettings(metrics_listen="", alert_interval_s=0))
    received: list[tuple[str, Usage]] = []

    def on_usage(member: str, batch: list[Usage]) -> None:
        received.extend((member, u) for u in batch)
        hub_monitor.score_usage(member, batch)

    server = StateServer(sock, on_usage=on_usage)
    server.start()
    rng = np.random.default_rng(7)
    profile = InputProfile.fit(rng.normal(size=(400, 3)))
    states = [_host(sock, f"w{i}") for i in range(2)]
    try:
        workers = [Monitor(MonitorSettings(metrics_listen=""), usage_sink=s.usage)
                   for s in states]
        x = rng.normal(size=(2, 3))
        y = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
        workers[0].score_later("m/1", profile, "spiffe://d/alice", x, y)
        workers[1].score_later("m/1", None, "spiffe://d/alice", np.array([[np.nan]]))
        for w in workers:
            w.flush()
        _wait(lambda: len(received) == 2, "both workers' usage at the hub")
        by_member = dict(received)
        first = by_member["w0"]
        np.testing.assert_array_equal(first.x, x)
        np.testing.assert_array_equal(first.y, y)
        assert InputProfile.from_json(first.profile).to_dict() == profile.to_dict()
        assert by_member["w1"].profile == b"" and by_member["w1"].y is None
        hub_monitor.flush()
        alerts = hub_monitor.alerts()
        assert [(a.kind, a.caller) for a in alerts] == [("bounds", "spiffe://d/alice")]
    finally:
        for s in states:
            s.close()
        server.stop()


def test_the_hub_refuses_object_arrays_and_oversized_frames(tmp_path):
    import socket as socketlib

    from gateway.state._wire import MAX_FRAME, WireError, recv, send

    sock_path = tmp_path / "run" / "state.sock"
    got: list[Usage] = []
    server = StateServer(sock_path, on_usage=lambda m, b: got.extend(b))
    server.start()
    try:
        with socketlib.socket(socketlib.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            send(sock, {"op": "hello", "member": "evil"})
            send(sock, {"op": "usage", "profiles": {},
                        "items": [["m", "c", "", "|O", [1], 0, "", [], -1]]}, [b"\0" * 8])
            sock.settimeout(5)
            with pytest.raises(WireError):  # the hub drops the connection
                recv(sock)
        with socketlib.socket(socketlib.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            send(sock, {"op": "hello", "member": "evil"})
            sock.sendall((MAX_FRAME + 1).to_bytes(4, "big") + (10).to_bytes(4, "big"))
            sock.settimeout(5)
            with pytest.raises(WireError):
                recv(sock)
        assert got == []
        state = _host(sock_path, "w0")  # the hub still serves everyone else
        assert state.buckets.take("k", 1.0, 1)
        state.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- end to end


def test_gateway_with_the_hub_gone_answers_unavailable_and_audits_it(tmp_path):
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from gateway.audit._store import read_records
    from gateway.devenv import make_demo_env, start_gateway
    from tests.conftest import channel_credentials

    sock = tmp_path / "run" / "state.sock"
    server = StateServer(sock)
    server.start()
    env = make_demo_env(tmp_path / "env", state={"backend": "host", "socket": str(sock),
                                                 "lease_tokens": 1, "timeout_seconds": 1.0},
                        monitor={"quota_rate": 1000.0, "quota_burst": 1000})
    gw = start_gateway(env)

    def infer() -> grpc.StatusCode:
        x = np.zeros((1, 4), dtype=np.float32)
        request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        with grpc.secure_channel(gw.target, channel_credentials(env, "scorer")) as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()

    try:
        assert infer() == grpc.StatusCode.OK
        server.stop()
        assert infer() == grpc.StatusCode.UNAVAILABLE  # lease of 1: nothing held, closed
        server = StateServer(sock)
        server.start()
        assert infer() == grpc.StatusCode.OK
    finally:
        gw.stop()
        server.stop()
    records = [json.loads(r) for _, _, recs, _tail in read_records(env.audit) for r in recs]
    decisions = [(r["decision"], r["reason"], r["status"]) for r in records
                 if r.get("kind") == "decision" and r.get("action") == "infer"]
    assert ("deny", "state-unavailable", "UNAVAILABLE") in decisions
    assert decisions.count(("allow", "policy", "OK")) == 2


def test_a_hub_with_a_state_file_keeps_the_desired_state_across_its_restart(tmp_path):
    sock, state_file = tmp_path / "run" / "state.sock", tmp_path / "run" / "desired.json"
    server = StateServer(sock, state_file=state_file)
    server.start()
    member = _host(sock, "w0")
    try:
        member.coordinator.subscribe("models", lambda k, p: None)
        assert member.coordinator.apply_everywhere("models", "m/1", {"op": "unload"}, 5.0) \
            == [Applied("w0", True, "")]
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    finally:
        member.close()
        server.stop()
    restarted = StateServer(sock, state_file=state_file)
    restarted.start()
    late = _host(sock, "w1")
    seen: list[tuple[str, dict]] = []
    try:
        late.coordinator.subscribe("models", lambda k, p: seen.append((k, dict(p))) or None)
        assert seen == [("m/1", {"op": "unload"})]
    finally:
        late.close()
        restarted.stop()


_MEMBER = """
import signal, sys
from pathlib import Path
from gateway.state import StateSettings, open_state
state = open_state(StateSettings(backend="host", socket=Path(sys.argv[1])), member=sys.argv[2])
state.coordinator.subscribe("policy", lambda k, p: print("applied", k, flush=True) or None)
print("subscribed", flush=True)
signal.sigwait({signal.SIGTERM})
state.close()
"""


def test_a_member_process_that_stops_answering_is_named(hub):
    sock, _ = hub
    proc = subprocess.Popen([sys.executable, "-c", _MEMBER, str(sock), "w-proc"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    here = _host(sock, "w-here")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "subscribed"
        here.coordinator.subscribe("policy", lambda k, p: None)
        answers = here.coordinator.apply_everywhere("policy", "reload", {"n": 1}, 10.0)
        assert answers == [Applied("w-here", True, ""), Applied("w-proc", True, "")]
        assert proc.stdout.readline().strip() == "applied reload"
        proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        answers = here.coordinator.apply_everywhere("policy", "reload", {"n": 2}, 1.0)
        assert answers[0] == Applied("w-here", True, "")
        assert answers[1].member == "w-proc" and not answers[1].ok
        assert "no answer within 1 s" in answers[1].detail
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        here.close()


def test_usage_the_hub_never_got_is_counted_unscored(tmp_path):
    state = _host(tmp_path / "none" / "state.sock", "w0", timeout_seconds=0.5)
    monitor = Monitor(MonitorSettings(metrics_listen=""), usage_sink=state.usage)
    try:
        for _ in range(3):
            monitor.score_later("m/1", None, "spiffe://d/alice", np.zeros((1, 2)))
        monitor.flush()
        assert monitor.metrics.registry.get_sample_value(
            "gateway_unscored_requests_total") == 3
    finally:
        state.close()


def test_members_configured_apart_never_refill_the_shared_bucket(hub):
    """During a configuration rollout two workers may hold different rules for one caller;
    alternating leases under the two rules must not reset the hub's bucket to full."""
    sock, _ = hub
    a = _host(sock, "a", lease_tokens=1)
    b = _host(sock, "b", lease_tokens=1)
    try:
        admitted = sum(a.buckets.take("k", 0.0, 10) + b.buckets.take("k", 0.0, 20)
                       for _ in range(100))
        assert 10 <= admitted <= 20
    finally:
        a.close()
        b.close()
