"""Worker processes behind one port (``[server] processes = 2``), over real mutual TLS.

The gateway runs as ``gateway serve`` in a subprocess: a supervisor, a hub owning the one
audit log, and two workers sharing the port. Which pid is which comes from the supervisor's
``<runtime_dir>/processes.json``. Each test checks effects: records on disk (their ``instance``
names the worker that served), receipts against the log's bytes, ``gateway audit verify``,
gRPC statuses and health.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.audit import offline
from gateway.audit._store import list_segments, read_data, split_records
from gateway.devenv import DemoEnv, GatewayProcess, make_demo_env, run_cli, start_gateway
from tests.conftest import channel_credentials
from tests.support.waiting import wait_for

RECEIPT_INDEX = "gateway-audit-index"
RECEIPT_LEAF = "gateway-audit-leaf-hash"


def _env(root: Path, **overrides: dict[str, object]) -> DemoEnv:
    server = {"processes": 2, "runtime_dir": "run", **overrides.pop("server", {})}
    audit = {"checkpoint_ms": 50, **overrides.pop("audit", {})}
    return make_demo_env(root, server=server, audit=audit, **overrides)


def _processes(env: DemoEnv) -> dict:
    return json.loads((env.root / "run" / "processes.json").read_text())


def _until(predicate: Callable[[], object], what: str, timeout: float = 60) -> object:
    """The shared wait (tests/support/waiting.py), in this file's argument order."""
    return wait_for(what, predicate, timeout)


def _request(request_id: str, rows: int = 1) -> pb.ModelInferRequest:
    x = np.ones((rows, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="demo-mlp", id=request_id,
                                   raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    return request


def _call(gw: GatewayProcess, request_id: str, identity: str = "scorer", rows: int = 1
          ) -> tuple[grpc.StatusCode, dict]:
    """One call on a connection of its own (the kernel picks the worker per connection)."""
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, identity)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            _, call = stub.ModelInfer.with_call(_request(request_id, rows), timeout=30)
        except grpc.RpcError as err:
            return err.code(), {}
        return grpc.StatusCode.OK, dict(call.trailing_metadata())


def _records(env: DemoEnv) -> list[bytes]:
    records: list[bytes] = []
    for _first, path in list_segments(env.audit):
        records.extend(split_records(read_data(path))[0])
    return records


def _check_receipts(env: DemoEnv, receipts: dict[int, str]) -> list[dict]:
    """Every acknowledged receipt names its record in the one log; the parsed records."""
    raw = _records(env)
    for index, leaf in receipts.items():
        assert index < len(raw), f"acknowledged record {index} is gone"
        assert hashlib.sha256(b"\x00" + raw[index]).hexdigest() == leaf, index
    return [json.loads(r) for r in raw]


def _verify(env: DemoEnv) -> None:
    result = run_cli("audit", "verify", "--config", str(env.config), "--json", "--quiet",
                     check=False)
    assert result.returncode == 0, result.stdout + result.stderr


class _Load:
    """Threads calling ModelInfer until stopped, each on a fresh connection after a failure;
    OK receipts and failure statuses kept."""

    def __init__(self, gw: GatewayProcess, threads: int = 4, rows: int = 1) -> None:
        self.gw, self.rows = gw, rows
        self.cond = threading.Condition()
        self.receipts: dict[int, str] = {}
        self.ok_ids: set[str] = set()
        self.ok_times: list[float] = []
        self.failures: list[tuple[str, grpc.StatusCode, str]] = []
        self.stop = threading.Event()
        self.stop_at_failure = False
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, n: int) -> None:
        creds = channel_credentials(self.gw.env, "scorer")
        k = 0
        while not self.stop.is_set():
            with grpc.secure_channel(self.gw.target, creds) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                while not self.stop.is_set():
                    k += 1
                    request_id = f"load-{n}-{k}"
                    try:
                        _, call = stub.ModelInfer.with_call(_request(request_id, self.rows),
                                                            timeout=30)
                    except grpc.RpcError as err:
                        with self.cond:
                            self.failures.append((request_id, err.code(), err.details()))
                            self.cond.notify_all()
                        if self.stop_at_failure:
                            return
                        break  # a fresh connection (the worker may be gone)
                    md = dict(call.trailing_metadata())
                    with self.cond:
                        self.receipts[int(md[RECEIPT_INDEX])] = md[RECEIPT_LEAF]
                        self.ok_ids.add(request_id)
                        self.ok_times.append(time.monotonic())
                        self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout=timeout), what

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)


@pytest.fixture
def started(tmp_path):
    env = _env(tmp_path / "env")
    gw = start_gateway(env)
    yield env, gw
    gw.stop()


def test_calls_land_on_both_workers_one_log_verifies_every_receipt_provable(started):
    env, gw = started
    procs = _processes(env)
    assert {procs["w1"]["pid"], procs["w2"]["pid"], procs["hub"]["pid"]}.isdisjoint({0})
    assert procs["supervisor"]["pid"] == gw.proc.pid
    receipts = {}
    for n in range(24):
        status, md = _call(gw, f"spread-{n}")
        assert status == grpc.StatusCode.OK
        receipts[int(md[RECEIPT_INDEX])] = md[RECEIPT_LEAF]
    assert gw.stop() == 0, "".join(gw.stderr_lines)
    records = _check_receipts(env, receipts)
    served = {r["instance"] for r in records if r["kind"] == "decision"
              and str(r.get("request_id", "")).startswith("spread-")}
    host = served and next(iter(served)).rsplit("/", 1)[0]
    assert served == {f"{host}/w1", f"{host}/w2"}, served
    # One index space: seq runs 0..n-1 across both workers' records and the hub's.
    assert [r["seq"] for r in records] == list(range(len(records)))
    _verify(env)
    # Every receipt is provable against the final signed checkpoint (the auditor's offline
    # verifier, from the receipt's leaf hash alone).
    key = offline.parse_verifier(
        run_cli("audit", "vkey", "--config", str(env.config)).stdout.strip())
    for index, leaf in receipts.items():
        proof = offline.prove_inclusion(env.audit, index)
        assert offline.verify_inclusion(proof, key, leaf=bytes.fromhex(leaf))[0] == index


def test_metrics_of_every_worker_on_one_endpoint(started):
    import urllib.request

    _env, gw = started
    for n in range(12):
        assert _call(gw, f"metrics-{n}")[0] == grpc.StatusCode.OK
    text = urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()
    allowed = [line for line in text.splitlines()
               if line.startswith("gateway_requests_total{") and 'action="infer"' in line
               and 'decision="allow"' in line]
    assert allowed and sum(float(line.rsplit(" ", 1)[1]) for line in allowed) >= 12, allowed
    # A gauge across workers: demo-mlp is loaded in every live worker (livemin).
    assert 'gateway_model_loaded{model="demo-mlp",version="1"} 1.0' in text


@pytest.mark.slow
def test_sigkill_of_a_worker_under_load_loses_no_acknowledged_record(started):
    env, gw = started
    before = _processes(env)
    load = _Load(gw)
    load.wait_for(lambda: len(load.receipts) >= 40, "calls before the kill")
    os.kill(before["w1"]["pid"], signal.SIGKILL)
    _until(lambda: (p := _processes(env)["w1"])["ready"] and p["pid"] != before["w1"]["pid"],
           "w1 restarted and ready")
    with load.cond:
        acked_before_back = len(load.receipts)
    load.wait_for(lambda: len(load.receipts) >= acked_before_back + 40, "calls after")
    load.finish()
    # The restarted worker serves again: fresh connections reach it.
    after = {}
    for n in range(24):
        status, md = _call(gw, f"after-{n}")
        assert status == grpc.StatusCode.OK
        after[int(md[RECEIPT_INDEX])] = md[RECEIPT_LEAF]
    assert _processes(env)["w2"]["pid"] == before["w2"]["pid"]  # the other kept serving
    assert gw.stop() == 0, "".join(gw.stderr_lines)
    records = _check_receipts(env, {**load.receipts, **after})
    served_after = {records[i]["instance"].rsplit("/", 1)[1] for i in after}
    assert served_after == {"w1", "w2"}, served_after
    # Failed calls were the killed worker's, and failed as unavailable, never as success.
    assert all(code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
               for _, code, _ in load.failures), load.failures
    _verify(env)


def _health(gw: GatewayProcess) -> int:
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer")) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10).status
        except grpc.RpcError as err:
            return -1 if err.code() == grpc.StatusCode.UNAVAILABLE else -2


@pytest.mark.slow
def test_sigkill_of_the_hub_fails_calls_closed_and_they_recover(started):
    env, gw = started
    receipts = {}
    load = _Load(gw)
    # Each caller stops at its first failure: callers retrying in a tight loop would be a
    # flood of refusals, answered RESOURCE_EXHAUSTED beyond [server] refusal_burst.
    load.stop_at_failure = True
    load.wait_for(lambda: len(load.receipts) >= 20, "calls before the kill")
    # The hub cannot come back while its signing key is away: the outage lasts until the
    # test puts it back (the supervisor keeps retrying, with back-off).
    key = next(env.root.glob("**/log.skey"))
    key.rename(key.with_name("away"))
    hub = _processes(env)["hub"]["pid"]
    os.kill(hub, signal.SIGKILL)
    load.wait_for(lambda: any(f[1] == grpc.StatusCode.UNAVAILABLE for f in load.failures),
                  "calls under load fail closed")
    load.finish()
    receipts.update(load.receipts)
    # Nothing is answered without its record: UNAVAILABLE, and health says NOT_SERVING.
    for n in range(8):
        assert _call(gw, f"down-{n}")[0] == grpc.StatusCode.UNAVAILABLE
    _until(lambda: _health(gw) == health_pb2.HealthCheckResponse.NOT_SERVING,
           "health NOT_SERVING in the worker answering")
    assert {f[1] for f in load.failures} <= {grpc.StatusCode.UNAVAILABLE}, load.failures
    key.with_name("away").rename(key)
    _until(lambda: (p := _processes(env)["hub"])["ready"] and p["pid"] != hub, "hub back")
    # Back: every worker serves again once its connection to the new hub is up.
    _until(lambda: all(_call(gw, f"back-{n}")[0] == grpc.StatusCode.OK for n in range(8)),
           "calls succeed again on fresh connections")
    for n in range(8):
        status, md = _call(gw, f"after-{n}")
        assert status == grpc.StatusCode.OK
        receipts[int(md[RECEIPT_INDEX])] = md[RECEIPT_LEAF]
    _until(lambda: _health(gw) == health_pb2.HealthCheckResponse.SERVING, "health SERVING")
    assert gw.stop() == 0, "".join(gw.stderr_lines)
    _check_receipts(env, receipts)
    _verify(env)


def test_sighup_reloads_the_policy_in_every_worker(tmp_path):
    env = _env(tmp_path / "env", policy={"watch": False})
    shutil.rmtree(env.policies / "tests")  # its cases expect the scorer allowed
    gw = start_gateway(env)
    try:
        assert all(_call(gw, f"pre-{n}")[0] == grpc.StatusCode.OK for n in range(6))
        policy = env.policies / "policy.csv"
        policy.write_text(policy.read_text() + "\np, role:scorers, demo-mlp, infer, deny\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        _until(lambda: sum(1 for r in map(json.loads, _records(env))
                           if r["kind"] == "policy_reload" and r.get("trigger") == "SIGHUP")
               >= 2, "a policy_reload record from each worker")
        # Every worker now denies: fresh connections, spread over both.
        codes = {_call(gw, f"post-{n}")[0] for n in range(16)}
        assert codes == {grpc.StatusCode.PERMISSION_DENIED}, codes
    finally:
        assert gw.stop() == 0, "".join(gw.stderr_lines)
    reloads = {r["instance"].rsplit("/", 1)[1] for r in map(json.loads, _records(env))
               if r["kind"] == "policy_reload" and r.get("trigger") == "SIGHUP"
               and r.get("accepted")}
    assert reloads == {"w1", "w2"}, reloads
    denied = {r["instance"].rsplit("/", 1)[1] for r in map(json.loads, _records(env))
              if r["kind"] == "decision" and str(r.get("request_id", "")).startswith("post-")
              and r.get("decision") == "deny"}
    assert denied == {"w1", "w2"}, denied


@pytest.mark.slow
def test_sigterm_drains_with_no_failed_in_flight_call(tmp_path):
    # Calls of 20,000 rows take long enough that several are in flight at the signal.
    env = _env(tmp_path / "env", server={"max_tensor_elements": 100_000})
    gw = start_gateway(env)
    load = _Load(gw, threads=6, rows=20_000)
    load.stop_at_failure = True
    load.wait_for(lambda: len(load.receipts) >= 12, "calls before SIGTERM")
    signalled = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=90) == 0, "".join(gw.stderr_lines)
    load.finish()
    # Calls were in flight at the signal (6 callers never pause): they finished, answered OK.
    assert any(t > signalled for t in load.ok_times)
    # Every call a worker began serving was answered: the calls the log holds as answered OK
    # are exactly those their callers got OK. Calls that failed were never served (no record
    # of them at all): refused once the workers stopped accepting (UNAVAILABLE), or, arriving
    # on an open connection in the instant gRPC shuts down, cancelled before any handler ran.
    assert {code for _, code, _ in load.failures} <= {grpc.StatusCode.UNAVAILABLE,
                                                       grpc.StatusCode.CANCELLED}, load.failures
    records = _check_receipts(env, load.receipts)
    logged_ok = {r["request_id"] for r in records if r["kind"] == "decision"
                 and r.get("status") == "OK" and str(r.get("request_id")).startswith("load-")}
    assert logged_ok == load.ok_ids
    logged = {r.get("request_id") for r in records}
    assert not logged & {request_id for request_id, _, _ in load.failures}
    _verify(env)  # the hub closed the log with a final signed checkpoint


def test_a_hub_that_cannot_open_the_log_stops_the_start_with_its_reason(tmp_path):
    env = _env(tmp_path / "env")
    (env.root / "audit-keys-moved").mkdir()
    signing_key = next(env.root.glob("**/log.skey"))
    signing_key.rename(env.root / "audit-keys-moved" / "log.skey")
    with pytest.raises(AssertionError) as info:
        start_gateway(env)
    assert "hub did not start" in str(info.value), str(info.value)
    assert not (env.root / "run" / "processes.json").exists()


def test_ctrl_c_reaches_the_supervisor_alone_and_drains(started):
    env, gw = started
    assert _call(gw, "before")[0] == grpc.StatusCode.OK
    procs = _processes(env)
    # Each child leads a process group of its own: a terminal's Ctrl-C (SIGINT to the
    # foreground group) reaches only the supervisor, which stops workers before the hub.
    assert os.getpgid(gw.proc.pid) != os.getpgid(procs["hub"]["pid"])
    assert {os.getpgid(procs[w]["pid"]) for w in ("w1", "w2")} == \
        {procs["w1"]["pid"], procs["w2"]["pid"]}
    gw.proc.send_signal(signal.SIGINT)
    assert gw.proc.wait(timeout=60) == 0, "".join(gw.stderr_lines)
    _verify(env)


def test_workers_write_a_postgresql_log_themselves(pg_fresh_dsn, tmp_path):
    from tests.e2e.test_audit_pg import check_receipts, stored

    env = _env(tmp_path / "env", audit={"backend": "postgresql", "dsn": pg_fresh_dsn,
                                        "checkpoint_ms": 200})
    gw = start_gateway(env)
    try:
        receipts = []
        for n in range(24):
            status, md = _call(gw, f"pg-{n}")
            assert status == grpc.StatusCode.OK
            receipts.append((int(md[RECEIPT_INDEX]), bytes.fromhex(md[RECEIPT_LEAF])))
        # No hub log: the hub serves no audit socket, and the file log was never created.
        assert not (env.root / "run" / "audit.sock").exists()
    finally:
        assert gw.stop() == 0, "".join(gw.stderr_lines)
    assert not list(env.audit.glob("**/*.log")) and not (env.audit / "checkpoint").exists()
    check_receipts(pg_fresh_dsn, receipts)
    served = {json.loads(bytes(data))["instance"].rsplit("/", 1)[1]
              for (data,) in stored(pg_fresh_dsn, "SELECT data FROM gateway_audit_record")
              if json.loads(bytes(data)).get("request_id", "").startswith("pg-")}
    assert served == {"w1", "w2"}, served


def test_a_callers_quota_holds_across_workers(tmp_path):
    # 1 call/s after a burst of 10, for the scorer, however its calls spread over workers.
    env = _env(tmp_path / "env", monitor={"metrics_listen": "127.0.0.1:0",
                                          "quota_rate": 1.0, "quota_burst": 10})
    gw = start_gateway(env)
    try:
        started = time.monotonic()
        codes = [_call(gw, f"quota-{n}")[0] for n in range(40)]
        elapsed = time.monotonic() - started
    finally:
        assert gw.stop() == 0, "".join(gw.stderr_lines)
    admitted = codes.count(grpc.StatusCode.OK)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    # Never more than one shared bucket admits (two buckets of their own would admit 20);
    # leased batches may refuse early, at most (workers - 1) * lease_tokens = 8 tokens.
    assert admitted <= 10 + 1.0 * elapsed, (admitted, elapsed)
    assert admitted >= 10 - 8, admitted
    records = [json.loads(r) for r in _records(env)]
    refused_by = {r["instance"].rsplit("/", 1)[1] for r in records if r["kind"] == "decision"
                  and str(r.get("request_id", "")).startswith("quota-")
                  and r.get("status") == "RESOURCE_EXHAUSTED"}
    assert refused_by == {"w1", "w2"}, refused_by


def test_reload_policy_rpc_on_one_worker_applies_in_every_worker(tmp_path):
    from gateway._proto.gateway.v1 import admin_pb2, admin_pb2_grpc

    env = _env(tmp_path / "env", policy={"watch": False})
    shutil.rmtree(env.policies / "tests")  # its cases expect the scorer allowed
    gw = start_gateway(env)
    try:
        assert {_call(gw, f"pre-{n}")[0] for n in range(8)} == {grpc.StatusCode.OK}
        policy = env.policies / "policy.csv"
        policy.write_text(policy.read_text() + "\np, role:scorers, demo-mlp, infer, deny\n")
        with grpc.secure_channel(gw.target, channel_credentials(env, "admin")) as channel:
            reply = admin_pb2_grpc.PolicyAdminStub(channel).ReloadPolicy(
                admin_pb2.ReloadPolicyRequest(), timeout=60)
        assert reply.accepted and not reply.error, reply
        # Applied everywhere before the reply: fresh connections, spread over both workers,
        # are all denied at once.
        codes = {_call(gw, f"post-{n}")[0] for n in range(16)}
        assert codes == {grpc.StatusCode.PERMISSION_DENIED}, codes
    finally:
        assert gw.stop() == 0, "".join(gw.stderr_lines)
    records = [json.loads(r) for r in _records(env)]
    reloads = {r["instance"].rsplit("/", 1)[1] for r in records
               if r["kind"] == "policy_reload" and r.get("trigger") == "admin RPC"
               and r.get("accepted") and r.get("new_digest") == reply.new_digest}
    assert reloads == {"w1", "w2"}, reloads


def _ready_everywhere(gw: GatewayProcess, model: str, connections: int = 16) -> set[bool]:
    """ModelReady of ``model`` as fresh connections (spread over the workers) see it."""
    seen = set()
    for _ in range(connections):
        with grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer")) as channel:
            seen.add(pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                pb.ModelReadyRequest(name=model, version="1"), timeout=30).ready)
    return seen


def _model_admin(gw: GatewayProcess, op: str, model: str, timeout: float = 60):
    from gateway._proto.gateway.v1 import admin_pb2, admin_pb2_grpc

    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "admin")) as channel:
        stub = admin_pb2_grpc.ModelAdminStub(channel)
        request = (admin_pb2.LoadModelRequest if op == "load" else
                   admin_pb2.UnloadModelRequest)(name=model, version="1")
        method = stub.LoadModel if op == "load" else stub.UnloadModel
        try:
            status, call = method.with_call(request, timeout=timeout)
        except grpc.RpcError as err:
            return err.code(), err.details(), dict(err.trailing_metadata() or ()), \
                [v for k, v in (err.trailing_metadata() or ()) if k == "gateway-replica"]
        md = call.trailing_metadata()
        return grpc.StatusCode.OK, status.state, dict(md), \
            [v for k, v in md if k == "gateway-replica"]


def test_load_and_unload_apply_in_every_worker_and_name_one_that_did_not(started):
    env, gw = started
    assert _ready_everywhere(gw, "demo-types") == {True}
    code, state, _, replicas = _model_admin(gw, "unload", "demo-types")
    assert (code, state) == (grpc.StatusCode.OK, "UNLOADED")
    assert sorted(r.rsplit("/", 1)[1] for r in replicas) == ["w1: ok", "w2: ok"], replicas
    # Applied in both workers before the reply: every connection sees it at once.
    assert _ready_everywhere(gw, "demo-types") == {False}
    code, state, _, replicas = _model_admin(gw, "load", "demo-types")
    assert (code, state) == (grpc.StatusCode.OK, "LOADED")
    assert _ready_everywhere(gw, "demo-types") == {True}
    # A worker that cannot answer (stopped) is named; the change reaches it when it resumes.
    w2 = _processes(env)["w2"]["pid"]
    os.kill(w2, signal.SIGSTOP)
    try:
        while True:  # until the call reaches w1 (connections given to w2 wait: deadline)
            code, details, _, replicas = _model_admin(gw, "unload", "demo-types", timeout=8)
            if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                break
    finally:
        os.kill(w2, signal.SIGCONT)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
    assert "w2" in details and "1 of 2" in details, details
    assert any(r.split(":", 2)[-1].strip() != "ok" and "/w2" in r for r in replicas), replicas
    _until(lambda: _ready_everywhere(gw, "demo-types") == {False},
           "the stopped worker applied the unload once resumed")
