"""The audit log in PostgreSQL beside the file log, side by side in one run.

    python -m bench audit_pg          # needs PostgreSQL: $GATEWAY_BENCH_DSN, else the test one

  * durable records/s: the file log (one process, 16 appending threads: the most a single
    log directory takes) against the PostgreSQL log written by 2 processes of 8 appending
    threads each (one log, one chain), ROUNDS rounds alternated, medians; also the
    PostgreSQL log from one process of 16 threads;
  * gateway throughput at concurrency 16 and p50 at concurrency 1: a gateway on the file log
    against the same gateway on the PostgreSQL log (bench.load, mutual TLS, ModelInfer).
Target (issue 19): >= 10,000 durable records/s into the PostgreSQL log from 16 callers
across 2 processes. Every append waits for its own durable commit, so 16 callers make at
most 16 / (commit latency) records/s: the bench prints the median commit latency it saw,
which bounds the figure on this disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.audit_bench import DECISION
from tests.support.postgres import schema_dsn

ROUNDS = 3
SECONDS = 3.0
DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _settings(root: Path, dsn: str = "") -> object:
    from gateway.audit import AuditSettings, ensure_keys

    s = AuditSettings(directory=root / "log", signing_key=root / "keys" / "log.skey",
                      payload_key=root / "keys" / "payload.key", name="bench.local/audit")
    ensure_keys(s)
    if dsn:
        s = dataclasses.replace(s, backend="postgresql", dsn=dsn,
                                witness=root / f"witness-{secrets.token_hex(4)}" / "checkpoint")
    return s


def _append_for(log, threads: int, seconds: float) -> tuple[int, list[float]]:
    """``threads`` callers appending for ``seconds``: records appended, commit latencies."""
    counts = [0] * threads
    latencies: list[float] = []
    log.observe_commits(lambda s, _n: latencies.append(s))
    stop = threading.Event()

    def caller(i: int) -> None:
        while not stop.is_set():
            log.append("decision", DECISION)
            counts[i] += 1

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds)  # the measuring window, not a synchronisation
    stop.set()
    for w in workers:
        w.join()
    return sum(counts), latencies


def worker(root: str, dsn: str, threads: int, seconds: float, name: str) -> None:
    """A writing process: open the PostgreSQL log, say ready, wait for go, append, report."""
    from gateway.audit import open_log

    log = open_log(_settings(Path(root), dsn), instance_id=name)  # type: ignore[arg-type]
    print("ready", flush=True)
    sys.stdin.readline()
    count, latencies = _append_for(log, threads, seconds)
    log.close()
    print(json.dumps({"records": count, "commit_ms": statistics.median(latencies) * 1e3}),
          flush=True)


def _pg_processes(root: Path, dsn: str, processes: int, threads: int) -> tuple[float, float]:
    """records/s of ``processes`` writers of ``threads`` callers each, started together."""
    procs = [subprocess.Popen([sys.executable, "-m", "bench.audit_pg_bench", "worker",
                               str(root), dsn, str(threads), str(SECONDS), f"bench-{i}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(processes)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        assert p.stdout is not None
        results.append(json.loads(p.stdout.readline()))
        p.wait()
    return (sum(r["records"] for r in results) / SECONDS,
            statistics.median(r["commit_ms"] for r in results))


def _file(root: Path, threads: int) -> tuple[float, float]:
    from gateway.audit import AuditLog

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        log = AuditLog.open(_settings(Path(tmp)), instance_id="bench")  # type: ignore[arg-type]
        count, latencies = _append_for(log, threads, SECONDS)
        log.close()
    return count / SECONDS, statistics.median(latencies) * 1e3


def _records(root: Path, server: str) -> None:
    print("\ndurable records/s, 16 callers; b = file log (1 process x 16 threads), "
          "c = PostgreSQL log (2 processes x 8 threads, one log)")
    print(f"{'round':>6} {'b rec/s':>9} {'b ms':>6} {'c rec/s':>9} {'c ms':>6} {'c/b':>6} "
          f"{'c1 rec/s':>9} {'c1 ms':>6}   (ms: median commit; c1: PostgreSQL, 1 process x 16)")
    _settings(root)  # the keys, made once before the writing processes read them
    rows = []
    for n in range(ROUNDS):
        schemas = schema_dsn(server, "audit", prefix="gwbench")
        dsn = next(schemas)
        try:
            b, b_ms = _file(root, 16)
            c, c_ms = _pg_processes(root, dsn, 2, 8)
            c1, c1_ms = _pg_processes(root, dsn, 1, 16)
        finally:
            next(schemas, None)
        rows.append((b, c, c1))
        print(f"{n + 1:>6} {b:>9.0f} {b_ms:>6.2f} {c:>9.0f} {c_ms:>6.2f} {c / b:>6.2f} "
              f"{c1:>9.0f} {c1_ms:>6.2f}", flush=True)
    b, c, c1 = (statistics.median(r[i] for r in rows) for i in range(3))
    print(f"{'median':>6} {b:>9.0f} {'':>6} {c:>9.0f} {'':>6} {c / b:>6.2f} {c1:>9.0f}")
    print(f"target >= 10,000 records/s into PostgreSQL from 2 processes: "
          f"{'met' if c >= 10_000 else 'NOT met'} ({c:.0f}/s)")


def _gateways(root: Path, server: str) -> None:
    from bench.gateway_bench import _section
    from gateway.devenv import make_demo_env, start_gateway

    schemas = schema_dsn(server, "audit", prefix="gwbench")
    dsn = next(schemas)
    try:
        file_env = make_demo_env(root / "gw-file")
        pg_env = make_demo_env(root / "gw-pg", audit={"backend": "postgresql", "dsn": dsn})
        gws = [start_gateway(file_env), start_gateway(pg_env)]
        try:
            tls = []
            for env in (file_env, pg_env):
                cert, key = env.client_files("scorer")
                tls.append(["--ca", str(env.certs / "ca.pem"), "--cert", str(cert),
                            "--key", str(key)])
            _section("b = gateway on the file audit log, c = the same gateway on the "
                     "PostgreSQL audit log", (gws[0].target, tls[0]), (gws[1].target, tls[1]),
                     (1, 16))
        finally:
            for gw in gws:
                gw.stop()
    finally:
        next(schemas, None)


def run() -> None:
    import psycopg

    server = os.environ.get("GATEWAY_BENCH_DSN", DEFAULT_DSN)
    try:
        psycopg.connect(server, connect_timeout=5).close()
    except psycopg.Error as err:
        print(f"no PostgreSQL at {server!r} ({str(err).strip()}): skipped")
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="gateway-bench-pg-") as tmp:
        _records(Path(tmp), server)
        _gateways(Path(tmp), server)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        root, dsn, threads, seconds, name = sys.argv[2:7]
        worker(root, dsn, int(threads), float(seconds), name)
    else:
        run()
