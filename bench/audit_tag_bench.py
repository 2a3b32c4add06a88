"""The commit tag's cost: durable appends with and without it, side by side, interleaved.

    python -m bench audit_tag

Every group commit writes one HMAC-SHA256 commit tag (``gateway/audit/_tags.py``) into a
second file before any of its records is acknowledged. Three ways side by side:
  * none: the tag skipped, one O_DSYNC write per commit (what the log did before tags);
  * dsync: the tag as a second O_DSYNC write after the records' (two flushes per commit);
  * direct: the tag written with O_DIRECT (no flush) just before the records' O_DSYNC
    write, whose flush makes both durable (one flush per commit; the default where the
    filesystem allows O_DIRECT).
Rounds alternate the ways so drift on this shared disk hits all alike; read the ratios.
Also printed: the HMAC alone.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.audit_bench import DECISION, _run_threads, _settings
from gateway.audit import AuditLog, _store, _tags
from gateway.audit._tags import CommitTag

SECONDS = 2.0
ROUNDS = 3
MODES = ("none", "dsync", "direct")


def _rate(mode: str, root: Path, threads: int) -> float:
    _store.DIRECT_TAGS = mode == "direct"
    log = AuditLog.open(_settings(root), instance_id="bench")
    if mode == "none":
        append = log._store.append
        log._store.append = lambda records, tag=None: append(records)  # the tag skipped
    try:
        return _run_threads(threads, lambda: log.append("decision", DECISION))
    finally:
        log.close()
        _store.DIRECT_TAGS = True


def _seal_us() -> float:
    key, n = os.urandom(32), 20_000
    tag = CommitTag(1, 123_456, "ab" * 32)
    started = time.perf_counter()
    for _ in range(n):
        _tags.seal(key, "bench.local/audit", tag)
    return (time.perf_counter() - started) / n * 1e6


def run() -> None:
    import bench.audit_bench as audit_bench

    audit_bench.SECONDS = SECONDS
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "var" if (Path.cwd() / "var").is_dir()
                                     else None) as tmp:
        root = Path(tmp)
        print(f"durable appends/s, median of {ROUNDS} alternating rounds of {SECONDS:.0f} s, "
              "and the ratio to no tag:")
        for threads in (1, 16, 64):
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(ROUNDS):
                for mode in MODES:
                    d = root / f"{mode}-{threads}-{r}"
                    d.mkdir()
                    rates[mode].append(_rate(mode, d, threads))
            med = {m: statistics.median(v) for m, v in rates.items()}
            print(f"  {threads:2d} appenders: " + "  ".join(
                f"{m} {med[m]:8,.0f}/s {med[m] / med['none']:5.2f}x" for m in MODES))
        print(f"one tag: HMAC seal {_seal_us():.1f} us")


if __name__ == "__main__":
    run()
