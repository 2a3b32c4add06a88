"""Usage windows across replicas (``[state] backend = "postgresql"``): every replica's
background-scoring rows reach the one replica holding the usage lease, each exactly once,
across takeovers; with the database cut a replica never blocks and counts what went unscored.
Needs the test server (tests/conftest.py ``pg_*`` fixtures; never skipped under CI)."""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter

import grpc
import numpy as np
import psycopg
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.devenv import make_replicas, start_gateway
from gateway.monitor import InputProfile, Monitor, MonitorSettings
from gateway.state import StateSettings, Usage, open_state
from gateway.state._pgusage import PgUsageScorer, PgUsageSink
from tests.conftest import channel_credentials
from tests.support.relay import PgRelay
from tests.support.waiting import wait_for

ALICE = "spiffe://d/alice"


class _Recorder:
    """A scorer's handler: what it was handed, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[str, float]] = []  # (member, the row's tag: x[0, 0])

    def __call__(self, member: str, batch: list[Usage]) -> None:
        with self.lock:
            self.rows.extend((member, float(u.x[0, 0])) for u in batch)

    def tags(self) -> list[float]:
        with self.lock:
            return [t for _, t in self.rows]


def _usage(tag: float, caller: str = ALICE) -> Usage:
    return Usage("m/1", caller, np.array([[tag, 0.5]]), np.array([[0.1, 0.9]], np.float32))


def _pending(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM gateway_usage").fetchone()
        return int(row[0]) if row else -1


def _submit(sink: PgUsageSink, tags: range | list[float]) -> None:
    for t in tags:
        assert sink.submit(_usage(float(t)))
    sink.flush()


def test_two_replicas_usage_is_scored_once_by_the_one_lease_holder(pg_fresh_dsn):
    """Two members insert one caller's usage; of two scorer candidates, one holds the lease
    and gets every row, with the member that sent it, exactly once; the table is trimmed."""
    sinks = [PgUsageSink(pg_fresh_dsn, f"r{i}", timeout=5.0) for i in range(2)]
    handlers = [_Recorder(), _Recorder()]
    scorers = [PgUsageScorer(pg_fresh_dsn, f"r{i}", handlers[i], timeout=5.0)
               for i in range(2)]
    try:
        for s in scorers:
            s.start()
        threads = [threading.Thread(target=_submit, args=(sinks[0], range(0, 300))),
                   threading.Thread(target=_submit, args=(sinks[1], range(300, 600)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for("600 rows scored", lambda: sum(len(h.tags()) for h in handlers) >= 600)
        assert [s.epoch is not None for s in scorers].count(True) == 1
        holder = handlers[[s.epoch is not None for s in scorers].index(True)]
        assert sorted(holder.tags()) == list(map(float, range(600)))  # each once, all there
        members = Counter(m for m, _ in holder.rows)
        assert members == {"r0": 300, "r1": 300}
        assert sum(s.dropped for s in sinks) == 0
        wait_for("consumed rows deleted", lambda: _pending(pg_fresh_dsn) == 0)
    finally:
        for s in scorers:
            s.close()
        for k in sinks:
            k.close()


def test_a_new_scorer_resumes_at_the_cursor_after_close_and_after_death(pg_fresh_dsn):
    """Scorer A consumes, then gives the lease up: B takes over and gets only what followed.
    B then dies without a word (thread stopped, connection dropped, lease kept): C takes over
    once the lease expires and gets only what B never consumed. No row twice, none lost."""
    sink = PgUsageSink(pg_fresh_dsn, "r0", timeout=5.0)
    got = {name: _Recorder() for name in "ABC"}
    a = PgUsageScorer(pg_fresh_dsn, "A", got["A"], lease_s=1.0, timeout=5.0)
    b = PgUsageScorer(pg_fresh_dsn, "B", got["B"], lease_s=1.0, timeout=5.0)
    c = PgUsageScorer(pg_fresh_dsn, "C", got["C"], lease_s=1.0, timeout=5.0)
    try:
        a.start()
        _submit(sink, range(0, 50))
        wait_for("A scored the first 50", lambda: len(got["A"].tags()) == 50)
        a.close()  # gives the lease up
        _submit(sink, range(50, 80))  # no scorer now: they wait in the table
        assert _pending(pg_fresh_dsn) >= 1
        b.start()
        wait_for("B scored the next 30", lambda: len(got["B"].tags()) == 30)
        assert b.epoch is not None and b.epoch > 0
        # B dies: no more ticks, no release; its lease stays until it expires.
        b._stop.set()
        assert b._thread is not None
        b._thread.join()
        b._link.broken()  # its connection gone, as with a dead process
        _submit(sink, range(80, 100))
        c.start()
        wait_for("C scored the last 20", lambda: len(got["C"].tags()) == 20)
        assert c.epoch is not None and c.epoch > (b.epoch or 0)
        everything = got["A"].tags() + got["B"].tags() + got["C"].tags()
        assert sorted(everything) == list(map(float, range(100)))
        assert sorted(got["B"].tags()) == list(map(float, range(50, 80)))
    finally:
        for s in (a, b, c):
            s.close()
        sink.close()


def test_a_fenced_scorer_consumes_nothing(pg_fresh_dsn):
    """A scorer whose lease another took (epoch moved on) reads no row on its next tick."""
    sink = PgUsageSink(pg_fresh_dsn, "r0", timeout=5.0)
    got = _Recorder()
    old = PgUsageScorer(pg_fresh_dsn, "old", got, lease_s=30.0, timeout=5.0)
    try:
        assert old.tick() is False and old.epoch is not None
        with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:  # another took over
            conn.execute("UPDATE gateway_usage_lease SET holder = 'new', epoch = epoch + 1")
        _submit(sink, range(5))
        old.tick()
        assert got.tags() == [] and old.epoch is None
        assert _pending(pg_fresh_dsn) == 1  # the batch waits for the holder
    finally:
        old.close()
        sink.close()


def test_database_cut_counts_unscored_never_blocks_and_recovers(pg_fresh_dsn):
    """Cut: submits still return at once (queued), each batch that cannot be written is
    counted unscored, through the monitor's metric; restored: the sink writes again by
    itself and the scorer gets exactly the rows written."""
    relay = PgRelay(pg_fresh_dsn)
    state = open_state(StateSettings(backend="postgresql", dsn=relay.dsn,
                                     timeout_seconds=2.0), member="r0")
    monitor = Monitor(MonitorSettings(metrics_listen=""), buckets=state.buckets,
                      usage_sink=state.usage)
    sink = state.usage
    assert isinstance(sink, PgUsageSink)
    got = _Recorder()
    scorer = PgUsageScorer(pg_fresh_dsn, "scorer", got, timeout=5.0)
    scorer.start()
    try:
        _submit(sink, range(0, 5))
        wait_for("the first rows scored", lambda: len(got.tags()) == 5)
        relay.cut()
        for t in range(5, 25):
            monitor.score_later("m/1", None, ALICE, np.array([[float(t), 0.5]]))
        wait_for("20 rows counted unscored",
                 lambda: monitor.metrics.unscored._value.get() == 20)
        assert sink.dropped == 20
        relay.restore()
        later = itertools.count(100)

        def probe() -> bool:  # a new row each time, until one of them is scored
            monitor.score_later("m/1", None, ALICE, np.array([[float(next(later)), 0.5]]))
            return any(t >= 100 for t in got.tags())

        wait_for("the sink writes again", probe)
        tags = got.tags()
        assert not set(tags) & set(map(float, range(5, 25)))  # lost, not scored late
        assert len(tags) == len(set(tags))
    finally:
        scorer.close()
        state.close()
        relay.close()


def test_the_scorer_survives_a_database_cut_and_resumes_at_the_cursor(pg_fresh_dsn):
    """The scorer's connection cut: nothing is consumed meanwhile (rows wait in the table);
    restored, it resumes by itself and scores each row once."""
    relay = PgRelay(pg_fresh_dsn)
    sink = PgUsageSink(pg_fresh_dsn, "r0", timeout=5.0)
    got = _Recorder()
    scorer = PgUsageScorer(relay.dsn, "s", got, lease_s=3.0, timeout=1.0)
    scorer.start()
    try:
        _submit(sink, range(0, 10))
        wait_for("the first rows scored", lambda: len(got.tags()) == 10)
        relay.cut()
        wait_for("the scorer sees the cut", lambda: scorer.epoch is None)
        _submit(sink, range(10, 30))
        assert _pending(pg_fresh_dsn) >= 1 and len(got.tags()) == 10
        relay.restore()
        wait_for("the rest scored after the cut", lambda: len(got.tags()) == 30)
        assert sorted(got.tags()) == list(map(float, range(30)))
    finally:
        scorer.close()
        sink.close()
        relay.close()


def test_a_full_queue_drops_and_counts_without_waiting(pg_fresh_dsn):
    sink = PgUsageSink(pg_fresh_dsn, "r0", timeout=5.0, max_backlog=3, interval_s=3600)
    dropped: list[int] = []
    sink.on_dropped(dropped.append)
    try:
        assert [sink.submit(_usage(float(t))) for t in range(5)] == [True] * 3 + [False] * 2
        assert sum(dropped) == 2 and sink.dropped == 2
    finally:
        sink.close()
    assert sink.written == 3 and _pending(pg_fresh_dsn) == 1  # close flushed the queue


def test_replicas_monitors_share_one_extraction_window(pg_fresh_dsn):
    """Two replicas' states and monitors as the server wires them: rows of one caller sent
    through both reach the lease holder's monitor with profile and arrays intact, and its
    detectors raise the alert (a bounds alert from the row sent through the other one)."""
    rng = np.random.default_rng(7)
    profile = InputProfile.fit(rng.normal(size=(400, 3)))
    settings = StateSettings(backend="postgresql", dsn=pg_fresh_dsn, timeout_seconds=5.0)
    states = [open_state(settings, member=f"r{i}") for i in range(2)]
    monitors = [Monitor(MonitorSettings(metrics_listen="", alert_interval_s=0),
                        buckets=s.buckets, usage_sink=s.usage) for s in states]
    seen: list[tuple[int, str, Usage]] = []
    lock = threading.Lock()

    def handler(i: int):
        def on_usage(member: str, batch: list[Usage]) -> None:
            with lock:
                seen.extend((i, member, u) for u in batch)
            monitors[i].score_usage(member, batch)
        return on_usage

    try:
        states[0].score_usage(handler(0))
        wait_for("r0 holds the usage lease", lambda: _holder(pg_fresh_dsn).startswith("r0 pid "))
        states[1].score_usage(handler(1))
        x = rng.normal(size=(2, 3))
        y = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
        monitors[0].score_later("m/1", profile, ALICE, x, y)
        monitors[1].score_later("m/1", profile, ALICE, np.array([[50.0, 0.0, 0.0]]))
        for m in monitors:
            m.flush()
        wait_for("both replicas' usage scored", lambda: len(seen) == 2)
        assert {i for i, _, _ in seen} == {0}  # the lease holder only
        by_member = {member: u for _, member, u in seen}
        np.testing.assert_array_equal(by_member["r0"].x, x)
        np.testing.assert_array_equal(by_member["r0"].y, y)
        assert InputProfile.from_json(by_member["r1"].profile).to_dict() == profile.to_dict()
        monitors[0].flush()
        alerts = monitors[0].alerts()
        assert [(a.kind, a.caller) for a in alerts] == [("bounds", ALICE)]
        assert monitors[1].alerts() == []
    finally:
        for s in states:
            s.close()


def _holder(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute("SELECT holder FROM gateway_usage_lease "
                               "WHERE expires > now()").fetchone()
        except psycopg.errors.UndefinedTable:
            return ""
        return str(row[0]) if row else ""


# --- two real gateway replicas ---------------------------------------------------------------

def _audit_records(gw) -> list[dict]:
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "auditor")) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        size = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest()).size
        entries = stub.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=size + 10_000))
    return [json.loads(e) for e in entries.entries]


def _infer(gw, x: list[list[float]]) -> grpc.StatusCode:
    request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[
        np.asarray(x, dtype=np.float32).tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(np.shape(x)))
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer")) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


def _bounds_alerts(gw) -> list[dict]:
    return [r for r in _audit_records(gw)
            if r.get("kind") == "anomaly" and r.get("alert") == "bounds"]


def test_a_far_out_row_served_by_one_replica_is_alerted_by_the_scoring_one(pg_fresh_dsn,
                                                                          tmp_path):
    """Two gateways with ``[state] backend = "postgresql"`` (each with its own audit log):
    a far-out row served by the replica that does not hold the usage lease is scored by the
    one that does, whose audit log records the alert; the serving replica's does not. The
    holder stopped, the other takes over and alerts on what it serves itself."""
    envs = make_replicas(tmp_path / "gw", state={"backend": "postgresql", "dsn": pg_fresh_dsn})
    gateways = [start_gateway(e) for e in envs]
    try:
        holder_id = wait_for("a replica holds the usage lease", lambda: _holder(pg_fresh_dsn))
        ids = [e.config.read_text().split('instance_id = "')[1].split('"')[0] for e in envs]
        h = [holder_id.startswith(f"{i} pid ") for i in ids].index(True)
        holder, other = gateways[h], gateways[1 - h]
        assert _infer(other, [[0.0, 0.0, 9.0, 0.0]]) == grpc.StatusCode.OK  # served
        alerts = wait_for("the holder's bounds alert", lambda: _bounds_alerts(holder))
        assert alerts[0]["caller"] == "spiffe://demo.local/svc/scorer"
        assert _bounds_alerts(other) == []
        holder.stop()  # gives the lease up
        wait_for("the other replica takes the lease over",
                 lambda: _holder(pg_fresh_dsn).startswith(f"{ids[1 - h]} pid "))
        assert _infer(other, [[0.0, -12.0, 0.0, 0.0]]) == grpc.StatusCode.OK
        wait_for("the new holder's own bounds alert", lambda: _bounds_alerts(other))
    finally:
        for gw in gateways:
            gw.stop()
