"""Cost of one quota check per call: this process's buckets vs the host's hub vs PostgreSQL.

    python -m bench state

The check is :meth:`gateway.monitor._quota.Quotas.admit` (what the guard calls per metered
call) on one thread, for one caller whose quota is never exhausted, with the state's
buckets: ``local`` (exact, in-process), ``host`` (a hub in another process on a Unix socket;
leased batches of ``lease_tokens``) and ``postgresql`` (the test database; leased batches).
Each leased backend is also run with a lease of 1 token, i.e. one round trip per call: what
leasing saves. Rounds alternate the backends, so each ratio compares runs side by side. Wall
time per call, and this process's CPU per call (the hub's and the database's CPU are not
in it: they run in other processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.monitor._quota import QuotaRule, Quotas
from gateway.state import Buckets, LeasedBuckets, StateSettings, local_state, open_state

CALLS = 20_000
ROUNDS = 3
RULE = QuotaRule(1e6, 1_000_000, "bench")
CALLER = "spiffe://bench.local/caller"
_HUB = ("import signal, sys\nfrom pathlib import Path\nfrom gateway.state import StateServer\n"
        "s = StateServer(Path(sys.argv[1])); s.start(); print('ready', flush=True)\n"
        "signal.sigwait({signal.SIGTERM}); s.stop()\n")


def _measure(buckets: Buckets, calls: int) -> tuple[float, float]:
    quotas = Quotas({CALLER: RULE}, None, 1024, time.monotonic, buckets)
    quotas.admit(CALLER)  # connect, create the row
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        quotas.admit(CALLER)
    return ((time.perf_counter() - wall) / calls * 1e6,
            (time.process_time() - cpu) / calls * 1e6)


def _pg_dsn() -> str | None:
    import psycopg

    dsn = os.environ.get("GATEWAY_TEST_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error:
        return None
    return dsn


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "run" / "state.sock"
        hub = subprocess.Popen([sys.executable, "-c", _HUB, str(sock)], stdout=subprocess.PIPE,
                               text=True)
        assert hub.stdout is not None and hub.stdout.readline().strip() == "ready"
        dsn = _pg_dsn()
        closers: list[Callable[[], None]] = []
        backends: dict[str, Buckets] = {"local": local_state().buckets}
        for k in (8, 1):
            host = open_state(StateSettings(backend="host", socket=sock, lease_tokens=k),
                              member=f"bench-{k}")
            closers.append(host.close)
            backends[f"host, lease {k}"] = host.buckets
            if dsn is not None:
                from gateway.state._pgbuckets import PgBucketStore

                store = PgBucketStore(dsn, f"bench-{k}", timeout=5.0)
                pg = LeasedBuckets(store, lease_tokens=k, lease_seconds=0.25)
                closers += [pg.close, store.close]
                backends[f"postgresql, lease {k}"] = pg
        try:
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
            for _ in range(ROUNDS):
                for name, buckets in backends.items():
                    calls = CALLS if "lease 1" not in name else CALLS // 8
                    results[name].append(_measure(buckets, calls))
        finally:
            for close in closers:
                close()
            hub.send_signal(signal.SIGTERM)
            hub.wait(timeout=10)
        load = os.getloadavg()[0]
        print(f"quota check (Quotas.admit), one thread, {ROUNDS} alternating rounds, median; "
              f"load average {load:.1f}")
        base = sorted(w for w, _ in results["local"])[ROUNDS // 2]
        for name, rows in results.items():
            wall = sorted(w for w, _ in rows)[ROUNDS // 2]
            cpu = sorted(c for _, c in rows)[ROUNDS // 2]
            print(f"  {name:22s} {wall:8.1f} us/call  {wall / base:7.2f}x   "
                  f"caller CPU {cpu:6.1f} us/call")
        if dsn is None:
            print("  postgresql: unreachable, not measured")
