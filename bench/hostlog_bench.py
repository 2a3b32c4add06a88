"""One audit log per host: durable records/s through the hub's socket vs the in-process log.

    python -m bench hostlog

Side by side in one run, alternating, ``ROUNDS`` times:
  * baseline: one process, the file ``AuditLog``, 16 threads appending decision records;
  * host: a ``LogServer`` in this process (the hub) and 2 worker processes x 8 threads
    appending the same records through ``RemoteAuditLog``.
Two shapes of load: back to back (each thread appends again as soon as it has its receipt),
and call-shaped (each thread announces a call, waits ``WORK_US`` with the GIL released as
inference would, then appends: what the gateway's guard does, so group commit can gather).
Printed: durable records/s and its ratio to the baseline, and the CPU per record (user +
system) of ALL the processes involved, split into the workers' share (what a call pays on
the request path) and the hub's. Figures go in bench/README.md with the load average.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.audit_bench import DECISION, _settings
from gateway.audit import AuditLog, LogServer

SECONDS = 3.0
ROUNDS = 3
#: Simulated inference per call in the call-shaped rows (microseconds, GIL released).
WORK_US = 300
WORKERS, THREADS = 2, 8

_WORKER = r"""
import resource, sys, threading, time
from pathlib import Path
from gateway.audit import AuditSettings, RemoteAuditLog
from bench.audit_bench import DECISION
sock, key, instance, threads, seconds, work = sys.argv[1:7]
work = float(work) / 1e6
log = RemoteAuditLog.connect(Path(sock), AuditSettings(payload_key=Path(key)),
                             instance_id=instance)
pause = threading.Event()
assert log.wait_connected(60)
print("ready", flush=True)
sys.stdin.readline()
counts = [0] * int(threads)
stop = threading.Event()
def run(i):
    n = 0
    while not stop.is_set():
        if work:
            log.announce()
            pause.wait(work)
        log.append("decision", DECISION)
        n += 1
    counts[i] = n
ts = [threading.Thread(target=run, args=(i,)) for i in range(int(threads))]
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for t in ts: t.start()
stop.wait(float(seconds))
stop.set()
for t in ts: t.join()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(sum(counts), t1 - t0, cpu, flush=True)
log.close()
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _in_process(root: Path, work_us: int) -> tuple[float, float]:
    """records/s and CPU seconds per record of 16 threads on the in-process log."""
    log = AuditLog.open(_settings(root), instance_id="bench")
    counts = [0] * (WORKERS * THREADS)
    stop, pause = threading.Event(), threading.Event()

    def work(i: int) -> None:
        n = 0
        while not stop.is_set():
            if work_us:
                log.announce()
                pause.wait(work_us / 1e6)
            log.append("decision", DECISION)
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(counts))]
    c0, t0 = _cpu(), time.perf_counter()
    for t in ts:
        t.start()
    stop.wait(SECONDS)
    stop.set()
    for t in ts:
        t.join()
    c1, t1 = _cpu(), time.perf_counter()
    log.close()
    n = sum(counts)
    return n / (t1 - t0), (c1 - c0) / n


def _host(root: Path, work_us: int) -> tuple[float, float, float]:
    """records/s, workers' and hub's CPU seconds per record through one LogServer."""
    s = _settings(root)
    server = LogServer(s, root / "run" / "audit.sock", instance_id="bench/hub")
    server.start()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root / "run" / "audit.sock"),
                               str(s.payload_key), f"bench/w{k}", str(THREADS), str(SECONDS),
                               str(work_us)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
             for k in range(WORKERS)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        c0 = _cpu()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            n, elapsed, cpu = p.stdout.readline().split()
            results.append((int(n), float(elapsed), float(cpu)))
        hub_cpu = _cpu() - c0
        for p in procs:
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
    n = sum(r[0] for r in results)
    return (n / max(r[1] for r in results), sum(r[2] for r in results) / n, hub_cpu / n)


def run() -> None:
    var = Path.cwd() / "var"
    with tempfile.TemporaryDirectory(dir=var if var.is_dir() else None) as tmp:
        root = Path(tmp)
        print(f"durable decision records, {SECONDS:.0f} s each: in-process AuditLog "
              f"({WORKERS * THREADS} threads) vs {WORKERS} worker processes x {THREADS} "
              f"threads through one LogServer; load average {os.getloadavg()[0]:.1f}")
        for work_us in (0, WORK_US):
            shape = f"call-shaped, {work_us} us of work a call" if work_us else "back to back"
            print(f"  {shape}:")
            print("  round  in-process rec/s  cpu/rec | host rec/s  ratio  cpu/rec "
                  "(workers + hub)  cpu ratio")
            for r in range(ROUNDS):
                (root / f"i{work_us}.{r}").mkdir()
                base, base_cpu = _in_process(root / f"i{work_us}.{r}", work_us)
                (root / f"h{work_us}.{r}").mkdir()
                rate, worker_cpu, hub_cpu = _host(root / f"h{work_us}.{r}", work_us)
                total = worker_cpu + hub_cpu
                print(f"  {r + 1:5d}  {base:16,.0f}  {base_cpu * 1e6:5.1f} us | {rate:10,.0f} "
                      f"{rate / base:5.2f}x  {total * 1e6:5.1f} us ({worker_cpu * 1e6:4.1f} + "
                      f"{hub_cpu * 1e6:4.1f})  {total / base_cpu:5.2f}x")
        print(f"  load average after: {os.getloadavg()[0]:.1f}")
