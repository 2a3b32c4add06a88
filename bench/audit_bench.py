"""Audit log throughput: durable appends with group commit vs one fsync per record, and verify.

    python -m bench audit

Figures are side by side in one run (the disk and CPUs are shared and noisy):
  * durable records/s: the baseline writes and fsyncs each record on its own (what a log
    without group commit does); the AuditLog commits whatever is pending in one write and one
    fdatasync, at 16 and 64 concurrent appenders;
  * CPU per append on the request path (validate, canonical encode, leaf hash);
  * ``verify`` throughput on a 1,000,000-record log, single process vs all CPUs.
Targets (issue 5): >= 20,000 durable records/s; verify >= 200,000 records/s.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

from gateway.audit import AuditLog, AuditSettings, ensure_keys
from gateway.audit._canonical import check, encode
from gateway.audit._keys import load_signer
from gateway.audit._merkle import Tree
from gateway.audit._note import Checkpoint, parse_vkey
from gateway.audit._store import FileStore
from gateway.audit._verify import verify_log

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
        check(DECISION)
        data = encode({**DECISION, "v": 1, "seq": i, "time_ms": 1, "kind": "decision",
                       "instance": "bench", "prev": "00" * 32})
        hashlib.sha256(b"\x00" + data).digest()
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
        leaf = hashlib.sha256(b"\x00" + data).digest()
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
    cpus = os.cpu_count() or 1
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

        n = 1_000_000
        started = time.perf_counter()
        (root / "big").mkdir()
        s = _synthetic_log(root / "big", n)
        print(f"verify: built a {n:,}-record log in {time.perf_counter() - started:.0f} s "
              f"({sum(p.stat().st_size for p in (s.directory / 'segments').iterdir()) >> 20}"
              " MiB)")
        vkey = parse_vkey(load_signer(s.signing_key).vkey)
        one = verify_log(s.directory, vkey, jobs=1)
        assert one.ok, one.summary()
        r1 = one.records / one.seconds
        print(f"  verify, 1 process     {r1:10,.0f} records/s   1.00x")
        if cpus > 1:
            par = verify_log(s.directory, vkey, jobs=cpus)
            assert par.ok, par.summary()
            rp = par.records / par.seconds
            print(f"  verify, {cpus} processes   {rp:10,.0f} records/s {rp / r1:6.2f}x")
        print("  target >= 200,000 records/s")


if __name__ == "__main__":
    run()
