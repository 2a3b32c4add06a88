"""One audit log per host: durable records/s through the hub's socket vs the in-process log.

    python -m bench hostlog

Side by side in one run, alternating, ``ROUNDS`` times:
  * baseline: one process, the file ``AuditLog``, 16 threads appending decision records;
  * host: a ``LogServer`` in this process (the hub) and 2 worker processes x 8 threads
    appending the same records through ``RemoteAuditLog``.
Two shapes of load: back to back (each thread appends again as soon as it has its receipt),
and call-shaped (each thread announces a call, waits ``WORK_US`` with the GIL released as
inference would, then appends: what the gateway's guard does, so group commit can gather);
for the latter, the CPU of the simulated calls alone (no log) is printed beside, to subtract.
Last, one caller appending back to back: the median append latency, in-process vs socket.
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
from gateway.audit import AuditLog, AuditSink, LogServer

SECONDS = 3.0
ROUNDS = 3
#: Simulated inference per call in the call-shaped rows (microseconds, GIL released).
WORK_US = 300
WORKERS, THREADS = 2, 8

_WORKER = r"""
import sys
from pathlib import Path
from gateway.audit import AuditSettings, RemoteAuditLog
from bench.hostlog_bench import loop
sock, key, instance, threads, work = sys.argv[1:6]
log = RemoteAuditLog.connect(Path(sock), AuditSettings(payload_key=Path(key)),
                             instance_id=instance)
assert log.wait_connected(60)
print("ready", flush=True)
sys.stdin.readline()
print(*loop(log, int(threads), int(work)), flush=True)
log.close()
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loop(log: AuditSink | None, threads: int, work_us: int) -> tuple[int, float, float, float]:
    """``threads`` callers for SECONDS: records, seconds, CPU seconds of this process, and the
    median append latency (s). ``log`` None: the simulated calls alone."""
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    stop, pause = threading.Event(), threading.Event()

    def run(i: int) -> None:
        n, lat, clock = 0, latencies[i], time.perf_counter
        while not stop.is_set():
            if work_us:
                if log is not None:
                    log.announce()
                pause.wait(work_us / 1e6)
            if log is not None:
                t = clock()
                log.append("decision", DECISION)
                lat.append(clock() - t)
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    c0, t0 = _cpu(), time.perf_counter()
    for t in ts:
        t.start()
    stop.wait(SECONDS)
    stop.set()
    for t in ts:
        t.join()
    c1, t1 = _cpu(), time.perf_counter()
    every = sorted(x for lat in latencies for x in lat)
    return sum(counts), t1 - t0, c1 - c0, every[len(every) // 2] if every else 0.0


def _in_process(root: Path, threads: int, work_us: int) -> tuple[float, float, float]:
    """records/s, CPU seconds per record and median latency on the in-process log."""
    log = AuditLog.open(_settings(root), instance_id="bench")
    try:
        n, elapsed, cpu, p50 = loop(log, threads, work_us)
    finally:
        log.close()
    return n / elapsed, cpu / n, p50


def _host(root: Path, workers: int, threads: int,
          work_us: int) -> tuple[float, float, float, float]:
    """records/s, the workers' and the hub's CPU seconds per record, and the workers' median
    latency, through one LogServer."""
    s = _settings(root)
    server = LogServer(s, root / "run" / "audit.sock", instance_id="bench/hub")
    server.start()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root / "run" / "audit.sock"),
                               str(s.payload_key), f"bench/w{k}", str(threads), str(work_us)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
             for k in range(workers)]
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
            n, elapsed, cpu, p50 = p.stdout.readline().split()
            results.append((int(n), float(elapsed), float(cpu), float(p50)))
        hub_cpu = _cpu() - c0
        for p in procs:
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
    n = sum(r[0] for r in results)
    return (n / max(r[1] for r in results), sum(r[2] for r in results) / n, hub_cpu / n,
            max(r[3] for r in results))


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
                  "(workers + hub)  cpu ratio" + ("  | calls alone cpu/call" if work_us else ""))
            for r in range(ROUNDS):
                (root / f"i{work_us}.{r}").mkdir()
                base, base_cpu, _ = _in_process(root / f"i{work_us}.{r}", WORKERS * THREADS,
                                                work_us)
                (root / f"h{work_us}.{r}").mkdir()
                rate, worker_cpu, hub_cpu, _ = _host(root / f"h{work_us}.{r}", WORKERS, THREADS,
                                                     work_us)
                total = worker_cpu + hub_cpu
                alone = ""
                if work_us:
                    n, _, cpu, _ = loop(None, WORKERS * THREADS, work_us)
                    alone = f"  | {cpu / n * 1e6:5.1f} us"
                print(f"  {r + 1:5d}  {base:16,.0f}  {base_cpu * 1e6:5.1f} us | {rate:10,.0f} "
                      f"{rate / base:5.2f}x  {total * 1e6:5.1f} us ({worker_cpu * 1e6:4.1f} + "
                      f"{hub_cpu * 1e6:4.1f})  {total / base_cpu:5.2f}x{alone}")
        print("  one caller, back to back: median append latency in-process | socket (ratio)")
        for r in range(ROUNDS):
            (root / f"i1.{r}").mkdir()
            _, _, p50 = _in_process(root / f"i1.{r}", 1, 0)
            (root / f"h1.{r}").mkdir()
            _, _, _, host_p50 = _host(root / f"h1.{r}", 1, 1, 0)
            print(f"  {r + 1:5d}  {p50 * 1e6:7.0f} us | {host_p50 * 1e6:7.0f} us "
                  f"({host_p50 / p50:4.2f}x)")
        print(f"  load average after: {os.getloadavg()[0]:.1f}")
