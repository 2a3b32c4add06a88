"""gateway.state on PostgreSQL: leased buckets shared by processes and replicas, exact under
concurrency, failing closed while the database is unreachable and recovering by itself.
Needs the test server (tests/conftest.py ``pg_*`` fixtures; never skipped under CI)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from gateway.errors import ConfigError, StateUnavailable
from gateway.state import LeasedBuckets, StateSettings, open_state
from gateway.state._pgbuckets import PgBucketStore
from tests.support.relay import PgRelay

ROOT = Path(__file__).resolve().parents[2]


def _buckets(dsn: str, member: str, **kw) -> tuple[PgBucketStore, LeasedBuckets]:
    store = PgBucketStore(dsn, member, timeout=kw.pop("timeout", 2.0))
    return store, LeasedBuckets(store, lease_tokens=kw.pop("lease_tokens", 4),
                                lease_seconds=kw.pop("lease_seconds", 0.2))


def test_lease_statement_loses_no_update_under_concurrency(pg_fresh_dsn):
    """Eight connections taking one token at a time (no leasing) from a bucket of 200 that
    never refills: exactly 200 granted, however the statements interleave."""
    stores = [PgBucketStore(pg_fresh_dsn, f"t{i}", timeout=5.0) for i in range(8)]
    granted = [0] * len(stores)

    def run(i: int) -> None:
        for _ in range(40):
            granted[i] += stores[i].lease("k", 0.0, 200, need=1, want=1)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sum(granted) == 200
        assert stores[0].lease("k", 0.0, 200, need=1, want=1) == (0, 0.0)
        stores[0].release("k", 0.0, 200, 5)
        assert stores[0].lease("k", 0.0, 200, need=2, want=8) == (5, 0.0)
    finally:
        for s in stores:
            s.close()


_TAKER = """
import json, sys, time
from pathlib import Path
from gateway.state import LeasedBuckets
from gateway.state._pgbuckets import PgBucketStore
dsn, member, go, seconds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
store = PgBucketStore(dsn, member, timeout=5.0)
buckets = LeasedBuckets(store, lease_tokens=4, lease_seconds=0.2)
buckets.take("warm-up", 1.0, 1)  # connect before the clock starts
(go.parent / f"ready-{member}").touch()
give_up = time.monotonic() + 60
while not go.exists() and time.monotonic() < give_up:
    time.sleep(0.001)
admitted = refused = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    if buckets.take("quota:spiffe://d/alice", 20.0, 40):
        admitted += 1
    else:
        refused += 1
buckets.close()
store.close()
print(json.dumps({"admitted": admitted, "refused": refused}), flush=True)
"""


def test_two_processes_share_one_quota_in_postgresql_within_the_bound(pg_fresh_dsn, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _TAKER, pg_fresh_dsn, f"r{i}", str(go),
                               "1.5"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]
    # Both connected (each says so with a file) before the clock starts.
    end = time.monotonic() + 60
    while not all((tmp_path / f"ready-r{i}").exists() for i in range(2)):
        assert time.monotonic() < end and all(p.poll() is None for p in procs), \
            "the two processes never connected"
        time.sleep(0.01)
    t0 = time.monotonic()
    go.touch()
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    elapsed = time.monotonic() - t0
    admitted = sum(r["admitted"] for r in results)
    bound = 40 + 20.0 * elapsed
    print(f"admitted {admitted} of at most {bound:.0f} ({results}, {elapsed:.2f} s)")
    assert 40 <= admitted <= bound
    assert all(r["admitted"] > 0 for r in results)


def test_database_unreachable_fails_closed_then_recovers_by_itself(pg_fresh_dsn):
    proxy = PgRelay(pg_fresh_dsn)
    dsn = proxy.dsn
    store, buckets = _buckets(dsn, "down", lease_tokens=1, timeout=1.0)
    try:
        assert buckets.take("k", 100.0, 100)
        proxy.cut()
        with pytest.raises(StateUnavailable) as err:  # the next lease needs the database
            buckets.take("k", 100.0, 100)
        assert err.value.status == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in str(err.value)
        with pytest.raises(StateUnavailable):  # still down: still closed
            buckets.take("k", 100.0, 100)
        proxy.restore()
        end = time.monotonic() + 30  # back by itself once the database is: no restart
        while True:
            try:
                assert buckets.take("k", 100.0, 100)
                break
            except StateUnavailable:
                assert time.monotonic() < end, "never recovered"
                time.sleep(0.05)
    finally:
        buckets.close()
        store.close()
        proxy.cut()


def test_terminated_backends_never_admit_wrongly_and_service_continues(pg_fresh_dsn):
    store, buckets = _buckets(pg_fresh_dsn, "terminated", lease_tokens=1)
    try:
        assert sum(buckets.take("k", 0.0, 5) for _ in range(3)) == 3
        with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
            ended = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE application_name = 'gateway-state terminated'"
                                 ).fetchone()[0]
        assert ended >= 1
        outcomes = []
        for _ in range(6):
            try:
                outcomes.append(buckets.take("k", 0.0, 5))
            except StateUnavailable:
                outcomes.append(None)
                time.sleep(1.1)  # past the fail-fast window; not a synchronisation
        assert outcomes.count(True) == 2  # exactly the 2 tokens left, never more
    finally:
        buckets.close()
        store.close()


def test_bad_dsn_fails_closed():
    store, buckets = _buckets("host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=1",
                              "bad", timeout=1.0)
    try:
        with pytest.raises(StateUnavailable, match="unreachable"):
            buckets.take("k", 1.0, 1)
    finally:
        store.close()


def test_open_state_postgresql_uses_the_pg_coordinator_or_says_it_is_missing(pg_fresh_dsn):
    settings = StateSettings(backend="postgresql", dsn=pg_fresh_dsn)
    if importlib.util.find_spec("gateway.state._pgcoord") is None:
        with pytest.raises(ConfigError, match="not available"):
            open_state(settings, member="r0")
        return
    state = open_state(settings, member="r0")
    try:
        assert state.backend == "postgresql" and state.buckets.take("k", 1.0, 1)
    finally:
        state.close()
