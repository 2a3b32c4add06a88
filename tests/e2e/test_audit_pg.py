"""The audit log in PostgreSQL: one log for every replica, on the real server of conftest's
``pg_server`` (a fresh schema per test or module; never skipped under CI).

In-process logs check the log's own promises (one chain from two writers, fencing of the
integrator, fail closed and recover, damage and rollback refused); gateway subprocesses on
two ports check them end to end (receipts from either provable from either, integrator
killed, backends terminated under load, export verified by the standalone verifier).
Waits are bounded polls of an observable effect (a row, a status, a checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.audit import AuditLogDamaged, AuditSettings, offline, open_log, pg_log_reader
from gateway.audit._merkle import leaf_hash
from gateway.audit._note import parse_checkpoint
from gateway.devenv import make_replicas, run_cli, start_gateway
from gateway.errors import AuditUnavailable
from tests.conftest import channel_credentials, schema_dsn
from tests.support.relay import PgRelay
from tests.support.waiting import wait_for


def pg_settings(demo_env, dsn: str, tmp_path: Path, name: str = "w", **changes) -> AuditSettings:
    """The demo's keys, the log in ``dsn``, a witness copy of this replica's own."""
    from gateway.config import load_config

    base = load_config(demo_env.config).audit
    return dataclasses.replace(base, backend="postgresql", dsn=dsn,
                               witness=tmp_path / f"witness-{name}" / "checkpoint", **changes)


def stored(dsn: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def export_and_verify(dsn: str, dest: Path) -> offline.Report:
    with pg_log_reader(dsn) as reader:
        reader.export(dest)
    return offline.verify_log(dest)


def check_receipts(dsn: str, receipts: list[tuple[int, bytes]]) -> None:
    """Every acknowledged receipt names a stored record with that leaf hash."""
    rows = dict(stored(dsn, "SELECT seq, data FROM gateway_audit_record"))
    seqs = sorted(rows)
    assert seqs == list(range(len(seqs))), "indices are not 0..n-1 without gaps"
    for index, leaf in receipts:
        assert index in rows, f"acknowledged record {index} is missing"
        assert leaf_hash(bytes(rows[index])) == leaf, f"record {index} is not the one receipted"


# -- the log itself, in-process --------------------------------------------------------------

def test_two_writers_one_chain_provable_from_either(demo_env, pg_fresh_dsn, tmp_path):
    a = open_log(pg_settings(demo_env, pg_fresh_dsn, tmp_path, "a"), instance_id="a")
    b = open_log(pg_settings(demo_env, pg_fresh_dsn, tmp_path, "b"), instance_id="b")
    receipts: list[tuple[str, int, bytes]] = []
    lock = threading.Lock()

    def work(log, name: str) -> None:
        for i in range(40):
            r = log.append("decision", {"rpc": "X", "request_id": f"{name}-{i}"})
            with lock:
                receipts.append((name, r.index, r.leaf_hash))

    threads = [threading.Thread(target=work, args=(log, f"{name}{k}"))
               for log, name in ((a, "a"), (b, "b")) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({index for _, index, _ in receipts}) == len(receipts) == 320
    # Each process's fresh checkpoint covers what it acknowledged; proofs from either.
    for log in (a, b):
        note = log.fresh_checkpoint()
        assert note is not None
        cp = parse_checkpoint(note.split("\n\n", 1)[0] + "\n")
        for _, index, leaf in receipts[::37]:
            if index < cp.size:
                for prover in (a, b):
                    path = prover.inclusion_proof(index, cp.size)
                    offline.verify_inclusion_path(index, cp.size, leaf, path, cp.root)
    a.close()
    b.close()
    check_receipts(pg_fresh_dsn, [(i, leaf) for _, i, leaf in receipts])
    report = export_and_verify(pg_fresh_dsn, tmp_path / "export")
    assert report.ok and report.status == 0, report.summary()
    records = [json.loads(r) for r in offline.read_entries(tmp_path / "export")]
    assert {r["instance"] for r in records} == {"a", "b"}
    assert [r["kind"] for r in records].count("log_close") == 2
    assert records[-1]["kind"] == "log_close" and records[-1]["records"] == len(records)


def test_cli_reads_the_database(demo_env, pg_fresh_dsn, tmp_path):
    log = open_log(pg_settings(demo_env, pg_fresh_dsn, tmp_path), instance_id="c")
    receipt = log.append("decision", {"rpc": "X"})
    first = log.fresh_checkpoint()
    for i in range(10):
        log.append("decision", {"rpc": "X", "request_id": str(i)})
    log.close()
    notes = [n for (n,) in stored(pg_fresh_dsn, "SELECT note FROM gateway_audit_checkpoint "
                                                "ORDER BY size")]
    config = ("--config", str(demo_env.config))
    vkey = offline.load_verifier(demo_env.root / "var" / "audit" / "keys" / "log.vkey")

    def cli(*args: str, check: bool = True):
        return run_cli("audit", *args, "--dsn", pg_fresh_dsn, *config, check=check)

    assert cli("checkpoint").stdout == notes[-1]
    assert cli("checkpoint", "--size", notes[0].split("\n")[1]).stdout == notes[0]
    entry = cli("entry", str(receipt.index)).stdout.encode()
    assert leaf_hash(entry) == receipt.leaf_hash
    lines = cli("entries", "--from", "0", "--to", "3").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [0, 1, 2]
    proof = cli("prove", str(receipt.index)).stdout
    assert offline.verify_inclusion(proof, vkey, entry=entry)[0] == receipt.index
    old_size, new_size = (int(n.split("\n")[1]) for n in (first, notes[-1]))
    consistency = cli("prove-consistency", str(old_size), str(new_size)).stdout
    offline.verify_consistency(first, notes[-1], consistency, vkey)
    verified = cli("verify", "--quiet", "--json")
    assert json.loads(verified.stdout)["ok"] is True
    assert cli("entry", "10000", check=False).returncode == 2  # no such record
    unreachable = run_cli("audit", "checkpoint", "--dsn",
                          "host=127.0.0.1 port=1 user=postgres dbname=test", check=False)
    assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr


def test_integrator_is_fenced_and_replaced(demo_env, pg_fresh_dsn, tmp_path):
    a = open_log(pg_settings(demo_env, pg_fresh_dsn, tmp_path, "a"), instance_id="a")
    b = open_log(pg_settings(demo_env, pg_fresh_dsn, tmp_path, "b"), instance_id="b")
    try:
        holder, epoch = stored(pg_fresh_dsn, "SELECT holder, epoch FROM gateway_audit_lease")[0]
        assert holder.startswith("a ")
        # b cannot store a checkpoint with a's epoch: it does not hold the lease.
        b.append("decision", {"rpc": "X"})
        before = stored(pg_fresh_dsn, "SELECT count(*) FROM gateway_audit_checkpoint")[0][0]
        b._sign(b._service, epoch)
        assert stored(pg_fresh_dsn, "SELECT count(*) FROM gateway_audit_checkpoint")[0][0] \
            == before
        # a stops renewing (as if paused or dead): its lease expires, b takes over.
        a._stop.set()
        a._sign_now.set()
        a._integrator.join()
        stored(pg_fresh_dsn, "UPDATE gateway_audit_lease SET expires = now() - interval '1 s'")
        wait_for("b to take the lease", lambda: stored(
            pg_fresh_dsn, "SELECT holder FROM gateway_audit_lease")[0][0].startswith("b "))
        new_epoch = stored(pg_fresh_dsn, "SELECT epoch FROM gateway_audit_lease")[0][0]
        assert new_epoch == epoch + 1
        r = b.append("decision", {"rpc": "after takeover"})
        wait_for("a checkpoint by b covering its record", lambda: stored(
            pg_fresh_dsn, "SELECT 1 FROM gateway_audit_checkpoint WHERE size > %s AND "
            "epoch = %s", (r.index, new_epoch)))
        # The former integrator, resuming with its old epoch, stores nothing.
        a.append("decision", {"rpc": "late"})
        count = stored(pg_fresh_dsn, "SELECT count(*) FROM gateway_audit_checkpoint")[0][0]
        with a._catchup_lock:
            a._catch_up(a._service)
        a._sign(a._service, epoch)
        assert stored(pg_fresh_dsn, "SELECT count(*) FROM gateway_audit_checkpoint")[0][0] \
            == count
        assert a._epoch is None
    finally:
        a.close()
        b.close()
    epochs = [e for (e,) in stored(pg_fresh_dsn, "SELECT epoch FROM gateway_audit_checkpoint "
                                                 "ORDER BY size")]
    assert epochs == sorted(epochs) and len(set(epochs)) >= 2
    report = export_and_verify(pg_fresh_dsn, tmp_path / "export")
    assert report.ok, report.summary()


def test_database_unreachable_fails_closed_and_recovers(demo_env, pg_fresh_dsn, tmp_path):

    proxy = PgRelay(pg_fresh_dsn)
    dsn = proxy.dsn
    log = open_log(pg_settings(demo_env, dsn, tmp_path, lease_ms=600, checkpoint_ms=200),
                   instance_id="u")
    try:
        first = log.append("decision", {"rpc": "before"})
        proxy.cut()
        with pytest.raises(AuditUnavailable):
            log.append("decision", {"rpc": "while down"})
        assert not log.healthy
        proxy.restore()
        # Back without a restart: a tick reaches the database and health returns.
        wait_for("the log to be healthy again", lambda: log.healthy)
        after = log.append("decision", {"rpc": "after"})
        assert after.index > first.index
    finally:
        log.close()
        proxy.close()
    check_receipts(pg_fresh_dsn, [(first.index, first.leaf_hash),
                                  (after.index, after.leaf_hash)])
    assert export_and_verify(pg_fresh_dsn, tmp_path / "export").ok


def test_unreachable_at_open_and_foreign_key_refused(demo_env, pg_fresh_dsn, tmp_path):
    with pytest.raises(AuditUnavailable, match=r"unreachable|cannot open"):
        open_log(pg_settings(demo_env, "host=127.0.0.1 port=1 user=postgres dbname=test",
                             tmp_path), instance_id="x")
    open_log(pg_settings(demo_env, pg_fresh_dsn, tmp_path), instance_id="k").close()
    # A replica with another signing key must not write to (or sign) this log.
    other = pg_settings(demo_env, pg_fresh_dsn, tmp_path, "other")
    keys = tmp_path / "other-keys"
    from gateway.audit import generate_keys

    other = dataclasses.replace(other, signing_key=keys / "log.skey",
                                payload_key=keys / "payload.key")
    generate_keys(other)
    with pytest.raises(AuditUnavailable, match="every replica needs the log's own keys"):
        open_log(other, instance_id="intruder")
    assert not stored(pg_fresh_dsn, "SELECT 1 FROM gateway_audit_record WHERE "
                      "convert_from(data, 'UTF8') LIKE '%%intruder%%'")


def test_altered_record_and_rollback_refused(demo_env, pg_fresh_dsn, tmp_path):
    settings = pg_settings(demo_env, pg_fresh_dsn, tmp_path)
    log = open_log(settings, instance_id="d")
    for i in range(5):
        log.append("decision", {"rpc": "X", "request_id": str(i)})
    log.close()
    # Someone with database access rewrites record 3: opening and verifying both refuse.
    stored(pg_fresh_dsn, "UPDATE gateway_audit_record SET data = convert_to(replace("
           "convert_from(data, 'UTF8'), '\"request_id\":\"2\"', '\"request_id\":\"9\"'), "
           "'UTF8') WHERE seq = 3")
    assert b'"request_id":"9"' in bytes(stored(
        pg_fresh_dsn, "SELECT data FROM gateway_audit_record WHERE seq = 3")[0][0])
    with pytest.raises(AuditLogDamaged):
        open_log(settings, instance_id="d2")
    result = run_cli("audit", "verify", "--dsn", pg_fresh_dsn, "--config",
                     str(demo_env.config), "--quiet", "--json", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert json.loads(result.stdout)["first_bad_index"] == 3
    # A database restored from an older backup (here: emptied) is older than the witness.
    stored(pg_fresh_dsn, "TRUNCATE gateway_audit_record, gateway_audit_checkpoint; "
           "UPDATE gateway_audit_log SET size = 0, prev = repeat('0', 64)")
    with pytest.raises(AuditLogDamaged, match="rolled back"):
        open_log(settings, instance_id="d3")


# -- end to end: gateway processes on two ports --------------------------------------------

def _infer_request(request_id: str) -> pb.ModelInferRequest:
    x = np.ones((1, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="demo-mlp", id=request_id,
                                   raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    return request


def infer(gw, channel: grpc.Channel | None = None) -> tuple[int, bytes] | None:
    """One allowed call; its receipt (index, leaf hash), or None if it failed."""
    own = channel is None
    channel = channel or grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer"))
    try:
        _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            _infer_request("pg"), timeout=30)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.UNAVAILABLE,
                              grpc.StatusCode.DEADLINE_EXCEEDED), err
        return None
    finally:
        if own:
            channel.close()
    meta = dict(call.trailing_metadata())
    return int(meta["gateway-audit-index"]), bytes.fromhex(meta["gateway-audit-leaf-hash"])


def prove_from(gw, index: int, leaf: bytes) -> int:
    """Ask ``gw``'s AuditService for an inclusion proof and check it; the tree size."""
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "auditor")) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        proof = wait_for(f"record {index} to be checkpointed on {gw.target}", lambda: _proof(
            stub, index))
    vkey = offline.load_verifier(gw.env.root / "var" / "audit" / "keys" / "log.vkey")
    cp = offline.open_checkpoint(proof.signed_note, vkey)
    offline.verify_inclusion_path(index, proof.tree_size, leaf, list(proof.hashes), cp.root)
    return proof.tree_size


def _proof(stub, index: int):
    try:
        return stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(index=index))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        return None


@pytest.fixture
def cluster(pg_server, tmp_path):
    """Two gateways on different ports writing one PostgreSQL log (schema of their own)."""
    schemas = schema_dsn(pg_server, "audit")
    dsn = next(schemas)
    envs = make_replicas(tmp_path / "gw", audit={"backend": "postgresql", "dsn": dsn,
                                                 "lease_ms": 1500, "checkpoint_ms": 300})
    gateways = [start_gateway(e) for e in envs]
    try:
        yield dsn, gateways
    finally:
        for gw in gateways:
            gw.stop()
        next(schemas, None)


def instance_of(gw) -> str:
    import tomllib

    return tomllib.loads(gw.env.config.read_text())["server"]["instance_id"]


def test_two_gateways_one_log(cluster, tmp_path):
    dsn, gateways = cluster
    receipts = [(gw, *r) for gw in gateways for _ in range(3) if (r := infer(gw))]
    assert len(receipts) == 6
    for _origin, index, leaf in receipts:
        sizes = {prove_from(gw, index, leaf) for gw in gateways}  # provable from either
        assert all(size > index for size in sizes)
    check_receipts(dsn, [(i, leaf) for _, i, leaf in receipts])
    result = run_cli("audit", "export", str(tmp_path / "export"), "--dsn", dsn,
                     "--config", str(gateways[0].env.config))
    assert result.returncode == 0
    report = offline.verify_log(tmp_path / "export")
    assert report.ok, report.summary()
    instances = {json.loads(r)["instance"] for r in offline.read_entries(tmp_path / "export")}
    assert instances == {instance_of(gw) for gw in gateways}
    # The CLI reads the same log through the config of either replica.
    proof = run_cli("audit", "prove", str(receipts[0][1]), "--config",
                    str(gateways[1].env.config)).stdout
    vkey = offline.load_verifier(gateways[0].env.root / "var" / "audit" / "keys" / "log.vkey")
    assert offline.verify_inclusion(proof, vkey, leaf=receipts[0][2])[0] == receipts[0][1]


def _load(gateways, stop: threading.Event, receipts: list,
          failures: list) -> list[threading.Thread]:
    def caller(gw) -> None:
        channel = grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer"))
        try:
            while not stop.is_set():
                try:
                    r = infer(gw, channel)
                except grpc.RpcError:  # the gateway was killed: its calls end
                    return
                except AssertionError as err:  # a status other than UNAVAILABLE
                    failures.append(err)
                    return
                (receipts if r else failures).append(r)
                if r is None and gw.proc.poll() is not None:
                    return
        finally:
            channel.close()

    threads = [threading.Thread(target=caller, args=(gw,)) for gw in gateways for _ in range(3)]
    for t in threads:
        t.start()
    return threads


def test_integrator_killed_under_load(cluster, tmp_path):
    dsn, gateways = cluster
    holder = wait_for("an integrator", lambda: stored(
        dsn, "SELECT holder, epoch FROM gateway_audit_lease WHERE expires > now()"))[0]
    victim = next(gw for gw in gateways if holder[0].startswith(instance_of(gw) + " "))
    survivor = next(gw for gw in gateways if gw is not victim)
    stop = threading.Event()
    receipts: list = []
    failures: list = []
    threads = _load(gateways, stop, receipts, failures)
    try:
        wait_for("calls under load", lambda: len(receipts) >= 30)
        os.kill(victim.proc.pid, signal.SIGKILL)  # mid-batch, most likely
        victim.proc.wait()
        taken = wait_for("the survivor to take over signing", lambda: stored(
            dsn, "SELECT holder, epoch FROM gateway_audit_lease WHERE holder LIKE %s "
            "AND expires > now()", (instance_of(survivor) + " %",)))[0]
        assert taken[1] > holder[1]
        count = len(receipts)
        wait_for("the survivor to keep serving", lambda: len(receipts) >= count + 20)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not [f for f in failures if f is not None], failures
    last = max(i for i, _ in receipts)
    wait_for("a checkpoint by the new integrator covering every receipt", lambda: stored(
        dsn, "SELECT 1 FROM gateway_audit_checkpoint WHERE size > %s AND epoch = %s",
        (last, taken[1])))
    check_receipts(dsn, receipts)
    for index, leaf in receipts[::25]:
        prove_from(survivor, index, leaf)
    report = export_and_verify(dsn, tmp_path / "export")
    assert report.ok, report.summary()


def test_backends_terminated_under_load(cluster, tmp_path):
    dsn, gateways = cluster
    names = [f"gateway-audit {instance_of(gw)}" for gw in gateways]
    stop = threading.Event()
    receipts: list = []
    failures: list = []
    threads = _load(gateways, stop, receipts, failures)
    ended = 0
    try:
        for _round in range(3):
            count = len(receipts)
            wait_for("calls under load", lambda count=count: len(receipts) >= count + 20)
            # Only this test's gateways' connections (their instance ids are unique).
            rows = stored(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = ANY(%s)", (names,))
            ended += sum(1 for (ok,) in rows if ok)
        count = len(receipts)
        wait_for("service to come back", lambda: len(receipts) >= count + 20)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert ended >= 6
    assert not [f for f in failures if f is not None], failures
    for gw in gateways:
        assert gw.proc.poll() is None, "a gateway died"
    check_receipts(dsn, receipts)
    wait_for("a checkpoint covering every receipt", lambda: stored(
        dsn, "SELECT 1 FROM gateway_audit_checkpoint WHERE size > %s",
        (max(i for i, _ in receipts),)))
    report = export_and_verify(dsn, tmp_path / "export")
    assert report.ok, report.summary()


def health(gw) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer")) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_gateway_not_serving_while_database_unreachable(pg_fresh_dsn, tmp_path):
    from grpc_health.v1 import health_pb2

    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    proxy = PgRelay(pg_fresh_dsn)
    dsn = proxy.dsn
    env = make_replicas(tmp_path / "gw", 1, audit={"backend": "postgresql", "dsn": dsn,
                                                   "lease_ms": 600, "checkpoint_ms": 200})[0]
    gw = start_gateway(env)
    try:
        before = infer(gw)
        assert before is not None and health(gw) == serving
        proxy.cut()
        wait_for("health NOT_SERVING", lambda: health(gw) == not_serving)
        assert infer(gw) is None  # UNAVAILABLE: no call without its durable record
        proxy.restore()
        wait_for("health SERVING again, without a restart", lambda: health(gw) == serving)
        after = wait_for("a call to succeed again", lambda: infer(gw))
        assert after[0] > before[0]
        assert gw.proc.poll() is None
    finally:
        gw.stop()
        proxy.close()
    check_receipts(pg_fresh_dsn, [before, after])
