"""Audit log throughput: durable appends with group commit vs one fsync per record, and verify.

    python -m bench audit

Figures are side by side in one run (the disk and CPUs are shared and noisy):
  * durable records/s: the baseline writes and fsyncs each record on its own (what a log
    without group commit does); the AuditLog commits whatever is pending in one write and one
    fdatasync, at 16 and 64 concurrent appenders;
  * CPU per append on the request path (validate, canonical encode, leaf hash);
  * ``verify`` throughput on a 1,000,000-record log with one and two worker processes, each
    as a ratio to the single-core SHA-256 leaf-hash rate over the same records, measured in
    the same run (before and after), beside the two other per-record costs of verify: the
    canonical-JSON check (parse and re-encode) and the tree over the leaves.
Targets: >= 20,000 durable records/s (issue 5); verify >= 300,000 records/s (issue 14).
:func:`verify_steps` splits a verify worker's CPU time per record into its steps.
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from gateway.audit import AuditLog, AuditSettings, ensure_keys, offline
from gateway.audit._canonical import check, encode, encode_checked
from gateway.audit._keys import load_signer
from gateway.audit._merkle import Levels, Tree, leaf_hash
from gateway.audit._note import Checkpoint
from gateway.audit._store import FileStore
from gateway.audit._verify import _check_batch

DECISION = {
    "caller": {"id": "spiffe://demo.local/svc/scorer", "cert_sha256": "ab" * 32,
               "issuer": "CN=gateway dev CA", "serial": "5f2c0e9a71"},
    "rpc": "ModelInfer", "action": "infer",
    "model": {"name": "demo-mlp", "version": "1", "digest": "sha256:" + "cd" * 32},
    "decision": "allow", "reason": "policy",
    "policy": {"digest": "ef" * 32, "rule": "p, spiffe://demo.local/svc/scorer, demo-mlp, infer"},
    "request_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "payload": {"hmac": "01" * 32,
                                                                      "size": 1024},
    "status": "OK", "latency_us": {"decision": 3, "inference": 40, "total": 120},
}
SECONDS = 3.0


def _settings(root: Path, **kw) -> AuditSettings:
    s = AuditSettings(directory=root / "log", signing_key=root / "keys" / "log.skey",
                      payload_key=root / "keys" / "payload.key", name="bench.local/audit", **kw)
    ensure_keys(s)
    return s


def _run_threads(threads: int, body) -> float:
    """Run ``body(stop)`` on ``threads`` threads for SECONDS; return records/s."""
    counts = [0] * threads
    stop = threading.Event()

    def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            body()
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    stop.wait(SECONDS)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _fsync_per_record(root: Path, threads: int) -> float:
    """Baseline: each record is its own write + fsync (serialised, as a single log must be)."""
    fd = os.open(root / "baseline.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lock = threading.Lock()
    data = encode(DECISION) + b"\n"

    def body() -> None:
        with lock:
            os.write(fd, data)
            os.fsync(fd)

    try:
        return _run_threads(threads, body)
    finally:
        os.close(fd)


def _group_commit(root: Path, threads: int, **kw) -> tuple[float, int]:
    s = _settings(root, **kw)
    log = AuditLog.open(s, instance_id="bench")
    try:
        rate = _run_threads(threads, lambda: log.append("decision", DECISION))
    finally:
        log.close()
    return rate, log.size


def _append_cpu() -> float:
    n = 50_000
    start = time.perf_counter()
    for i in range(n):
        check(DECISION, "decision")  # what AuditLog.append does
        data = encode_checked({**DECISION, "v": 1, "seq": i, "time_ms": 1, "kind": "decision",
                               "instance": "bench", "prev": "00" * 32}, "decision")
        leaf_hash(data)
    return (time.perf_counter() - start) / n * 1e6


def _synthetic_log(root: Path, n: int) -> AuditSettings:
    """A log of ``n`` decision records written in large batches (no per-batch fsync wait)."""
    s = _settings(root)
    store = FileStore(s.directory, s.segment_bytes, 0, True)
    store.open(lambda first, records: None)
    signer = load_signer(s.signing_key)
    tree = Tree()
    prev = "0" * 64
    batch: list[bytes] = []
    for i in range(n):
        data = encode({**DECISION, "request_id": f"r{i}", "v": 1, "seq": i,
                       "time_ms": 1_764_000_000_000 + i, "kind": "decision",
                       "instance": "bench", "prev": prev})
        leaf = leaf_hash(data)
        tree.append(leaf)
        prev = leaf.hex()
        batch.append(data)
        if len(batch) == 20_000 or i == n - 1:
            store.append(batch)
            batch = []
        if (i + 1) % 100_000 == 0 or i == n - 1:
            store.publish(signer.sign(Checkpoint(signer.name, i + 1, tree.root(i + 1)).text()))
    store.close()
    return s


def run() -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "var" if (Path.cwd() / "var").is_dir()
                                     else None) as tmp:
        root = Path(tmp)
        size = len(encode({**DECISION, "v": 1, "seq": 123456, "time_ms": 1_764_000_000_000,
                           "kind": "decision", "instance": "bench", "prev": "00" * 32}))
        print(f"durable appends, {SECONDS:.0f} s each, decision records of {size} bytes:")
        base = _fsync_per_record(root, 16)
        print(f"  one write+fsync per record (16 threads)   {base:10,.0f} records/s   1.00x")
        for threads in (16, 64):
            (root / f"g{threads}").mkdir()
            rate, _ = _group_commit(root / f"g{threads}", threads)
            print(f"  group commit, preallocated ({threads:2d} threads) {rate:10,.0f} records/s "
                  f"{rate / base:6.2f}x")
        (root / "grow").mkdir()
        rate, _ = _group_commit(root / "grow", 64, preallocate=False)
        print(f"  group commit, growing file  (64 threads) {rate:10,.0f} records/s "
              f"{rate / base:6.2f}x")
        print("  target >= 20,000 durable records/s")
        print(f"CPU per append (check + canonical encode + leaf hash): {_append_cpu():.1f} us")

        verify_figures(root, 1_000_000)


def verify_figures(root: Path, n: int) -> None:
    """verify records/s on an ``n``-record log, beside the SHA-256 rate (see the module doc)."""
    cpus = os.cpu_count() or 1
    started = time.perf_counter()
    (root / "big").mkdir()
    s = _synthetic_log(root / "big", n)
    print(f"verify: built a {n:,}-record log in {time.perf_counter() - started:.0f} s "
          f"({sum(p.stat().st_size for p in (s.directory / 'segments').iterdir()) >> 20}"
          " MiB)")
    vkey = offline.parse_verifier(load_signer(s.signing_key).vkey)
    sample = offline.read_entries(s.directory, 0, 200_000)
    sha0 = _rate(lambda: list(map(leaf_hash, sample)), len(sample))
    runs = []
    for jobs in (1, 2):
        cpu0 = _cpu_seconds()
        report = offline.verify_log(s.directory, vkey, jobs=jobs)
        assert report.ok, report.summary()
        runs.append((jobs, report.records / report.seconds,
                     (_cpu_seconds() - cpu0) / report.records * 1e6))
    sha1 = _rate(lambda: list(map(leaf_hash, sample)), len(sample))
    sha = (sha0 + sha1) / 2
    json_rate = _rate(lambda: _check_batch(sample, 0, []), len(sample))
    leaves = list(map(leaf_hash, sample))
    tree_rate = _rate(lambda: Levels(0, leaves), len(sample))
    print(f"  SHA-256 leaf hashes, 1 core  {sha:10,.0f} /s   1.00x   (before {sha0:,.0f}, "
          f"after {sha1:,.0f})")
    print(f"  canonical JSON check, 1 core {json_rate:10,.0f} /s {json_rate / sha:6.2f}x   "
          "(parse, write back in groups, compare)")
    print(f"  tree over leaf hashes, 1 core{tree_rate:10,.0f} /s {tree_rate / sha:6.2f}x")
    for jobs, rate, cpu_us in runs:
        print(f"  verify, {jobs} process{'es' if jobs > 1 else '  '}        {rate:10,.0f} "
              f"records/s {rate / sha:6.2f}x   ({rate / 300_000:.0%} of the target; "
              f"{cpu_us:.1f} us CPU a record)")
    if len(runs) == 2:
        print(f"  2 processes / 1 process      {runs[1][1] / runs[0][1]:10.2f}x   (ideal "
              f"{min(cpus, 2)}.00x on idle cores; the pieces are handed out largest first)")
    cpu_us = min(r[2] for r in runs)
    print(f"  target >= 300,000 verify records/s ({300_000 / sha:.2f}x the SHA-256 rate "
          f"measured here); {cpus} CPU(s). At {cpu_us:.1f} us CPU a record, {cpus} idle "
          f"cores give at most {cpus / cpu_us * 1e6:,.0f} records/s")


def verify_steps(n: int = 80_000) -> None:
    """CPU time per record of each step of a verify worker, over the first (full) segment of
    an ``n``-record log (``python -c "import bench.audit_bench as b; b.verify_steps()"``; gc
    off, as in the workers). Each step is measured as the worker runs it, block by block (its
    records in the cache), cumulatively: a line's figure less the one above is that step's
    cost. Best of five per step: the machine is shared."""
    import gc

    from gateway.audit._merkle import leaf_hashes
    from gateway.audit._segment import Tail, read_segment
    from gateway.audit._verify import _CHUNK, _check_batch, _scan, _suspects

    def upto(step: int) -> int:
        count, leaves = 0, []
        for block, records in read_segment(str(path), Tail(), last=False, chunk=_CHUNK):
            count += len(records)
            if step >= 1:
                suspects = _suspects(block, records)
            if step >= 2:
                _check_batch(records, 0, suspects)
            if step >= 3:
                hashes = leaf_hashes(records)
                leaves += hashes
            if step >= 4:
                list(map(bytes.hex, hashes))
        if step >= 5:
            Levels(0, leaves)
        return count

    with tempfile.TemporaryDirectory() as tmp:
        s = _synthetic_log(Path(tmp), n)
        path = min((s.directory / "segments").iterdir())
        steps = {
            "read in blocks, split into records": lambda: upto(0),
            "+ float and non-ASCII scan": lambda: upto(1),
            "+ canonical check (parse, write back, compare)": lambda: upto(2),
            "+ SHA-256 leaf hashes": lambda: upto(3),
            "+ hex of the leaves (prev links)": lambda: upto(4),
            "+ the tree over the leaves": lambda: upto(5),
            "the whole worker (_scan)": lambda: _scan(str(path), 0, False, ()).count,
        }
        enabled = gc.isenabled()
        gc.disable()
        try:
            best = dict.fromkeys(steps, float("inf"))
            for _ in range(5):
                for label, fn in steps.items():
                    started = time.process_time()
                    count = fn()
                    best[label] = min(best[label], (time.process_time() - started) / count)
            for label, seconds in best.items():
                print(f"  {label:48s} {seconds * 1e6:5.2f} us a record")
            print(f"  ({count:,} records, load {os.getloadavg()[0]:.1f})")
        finally:
            if enabled:
                gc.enable()


def compare_packages(old: str, rounds: int = 3, n: int = 1_000_000) -> None:
    """Before/after of the whole verifier: the ``gateway`` package unpacked at ``old`` (e.g.
    ``git archive REV gateway | tar -x -C /tmp/before``) and this one, each verifying the same
    ``n``-record log in a fresh process, alternated, one and two worker processes; CPU time per
    record is user + system of the verifying process and its workers."""
    import subprocess
    import sys

    script = ("import os, resource, sys, time; from pathlib import Path; "
              "from gateway.audit import offline; "
              "vkey = offline.parse_verifier(Path(sys.argv[2]).read_text()); "
              "started = time.perf_counter(); "
              "report = offline.verify_log(Path(sys.argv[1]), vkey, jobs=int(sys.argv[3])); "
              "wall = time.perf_counter() - started; assert report.ok, report.summary(); "
              "use = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, "
              "resource.RUSAGE_CHILDREN)]; "
              "cpu = sum(u.ru_utime + u.ru_stime for u in use); "
              "print(report.records, wall, cpu, offline.__file__)")
    with tempfile.TemporaryDirectory() as tmp:
        s = _synthetic_log(Path(tmp), n)
        vkey = Path(tmp) / "log.vkey"
        vkey.write_text(load_signer(s.signing_key).vkey)
        for r in range(rounds):
            for jobs in (1, 2):
                for name, env in (("before", {"PYTHONPATH": old}), ("after", {})):
                    out = subprocess.run(
                        [sys.executable, "-c", script, str(s.directory), str(vkey), str(jobs)],
                        env={**os.environ, **env}, cwd=tmp,  # not this checkout's gateway/
                        check=True, capture_output=True, text=True).stdout.split()
                    records, wall, cpu = int(out[0]), float(out[1]), float(out[2])
                    assert (name == "before") == out[3].startswith(old), out[3]
                    print(f"  round {r} {name:6s} {jobs} process(es) {records / wall:10,.0f} "
                          f"records/s {cpu / records * 1e6:5.2f} us CPU a record "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)


def compare_scans(old: str, rounds: int = 3, n: int = 1_000_000) -> None:
    """Before/after of a verify worker, segment by segment, in one process: the ``gateway``
    package unpacked at ``old`` (``git archive REV gateway | tar -x -C /tmp/before``) is loaded
    as ``gateway_before`` beside this one, and each full segment of an ``n``-record log is
    scanned by both, in alternating order; CPU time (user + system) per record, and the ratio
    after/before of each pair (the load moves between pairs far more than within one)."""
    import gc
    import importlib
    import re
    import shutil
    import statistics
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        # The old package under another name, so both load in one process.
        shutil.copytree(Path(old) / "gateway", Path(tmp) / "gateway_before")
        pattern = re.compile(r"\b(from|import) gateway\b")
        for path in (Path(tmp) / "gateway_before").rglob("*.py"):
            path.write_text(pattern.sub(r"\1 gateway_before", path.read_text()))
        sys.path.insert(0, tmp)
        try:
            before = importlib.import_module("gateway_before.audit._verify")
        finally:
            sys.path.remove(tmp)
        from gateway.audit import _verify
        from gateway.audit._store import scan_segments

        s = _synthetic_log(Path(tmp), n)
        full = scan_segments(s.directory)[0][:-1]  # the last segment is not full
        cpu: dict[str, list[float]] = {"before": [], "after": []}
        loads = []
        enabled = gc.isenabled()
        gc.disable()
        try:
            for r in range(rounds):
                for k, (first, path) in enumerate(full):
                    pair = [("before", before), ("after", _verify)]
                    for name, module in pair if (r + k) % 2 else pair[::-1]:
                        use0 = resource.getrusage(resource.RUSAGE_SELF)
                        count = module._scan(str(path), first, False, ()).count
                        use1 = resource.getrusage(resource.RUSAGE_SELF)
                        cpu[name].append((use1.ru_utime - use0.ru_utime + use1.ru_stime
                                          - use0.ru_stime) / count * 1e6)
                    loads.append(os.getloadavg()[0])
        finally:
            if enabled:
                gc.enable()
        print(f"  {len(cpu['after'])} segment pairs, load {min(loads):.1f}-{max(loads):.1f}")
        for name, values in cpu.items():
            values.sort()
            print(f"  {name:6s} us CPU a record: min {values[0]:.2f}, quartile "
                  f"{values[len(values) // 4]:.2f}, median {statistics.median(values):.2f}")
        ratios = sorted(a / b for a, b in zip(cpu["after"], cpu["before"], strict=True))
        print(f"  after/before per pair: median {statistics.median(ratios):.3f} (quartiles "
              f"{ratios[len(ratios) // 4]:.3f}, {ratios[3 * len(ratios) // 4]:.3f})")


def compare_verifiers(old: str, rounds: int = 2, n: int = 1_000_000) -> None:
    """Before/after: the ``_verify.py`` at ``old`` (e.g. ``git show REV:gateway/audit/_verify.py
    > /tmp/old_verify.py``) and the current one, alternated on one ``n``-record log, with CPU
    time per record (user + system of this process and its finished workers). The old module
    runs on today's other modules (segment reader, canonical scan, tree); for a change that
    spans them, :func:`compare_packages`."""
    import importlib.util
    import sys

    from gateway.audit import _verify

    spec = importlib.util.spec_from_file_location("gateway.audit._verify_before", old)
    before = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = before
    spec.loader.exec_module(before)
    with tempfile.TemporaryDirectory() as tmp:
        s = _synthetic_log(Path(tmp), n)
        vkey = offline.parse_verifier(load_signer(s.signing_key).vkey)
        for r in range(rounds):
            for jobs in (1, 2):
                for name, module in (("before", before), ("after", _verify)):
                    cpu0 = _cpu_seconds()
                    report = module.verify_log(s.directory, vkey, jobs=jobs)
                    assert report.ok, report.summary()
                    cpu_us = (_cpu_seconds() - cpu0) / report.records * 1e6
                    print(f"  round {r} {name:6s} {jobs} process(es) "
                          f"{report.records / report.seconds:10,.0f} records/s "
                          f"{cpu_us:5.2f} us CPU a record (load {os.getloadavg()[0]:.1f})")


def _cpu(fn) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (verify's worker processes)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _rate(fn, n: int) -> float:
    """Items/s of ``fn`` over ``n`` items, the best of three (the machine is shared)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return n / best


if __name__ == "__main__":
    run()
