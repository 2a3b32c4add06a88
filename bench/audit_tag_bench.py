"""The commit tag's cost: durable appends with and without it, side by side, interleaved.

    python -m bench audit_tag

Every group commit writes, after its records are durable and before any is acknowledged,
one HMAC-SHA256 commit tag (``gateway/audit/_tags.py``) with one small ``O_DSYNC`` write
into a second file. The baseline is the same log with the tag write skipped (what the log
did before tags). Rounds alternate the two so drift on this shared disk hits both alike;
the figure to read is the ratio. Also printed: the HMAC alone and the tag write alone.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.audit_bench import DECISION, _run_threads, _settings
from gateway.audit import AuditLog, _tags
from gateway.audit._tags import CommitTag

SECONDS = 2.0
ROUNDS = 3


class _Untagged(AuditLog):
    """The log as it was before commit tags (baseline only: it proves nothing at open)."""

    def _write_tag(self, size: int, head: str, *, closed: bool = False) -> None:
        pass


def _rate(cls: type[AuditLog], root: Path, threads: int) -> float:
    log = cls.open(_settings(root), instance_id="bench")
    try:
        return _run_threads(threads, lambda: log.append("decision", DECISION))
    finally:
        log.close()


def _micro(root: Path) -> tuple[float, float]:
    """Microseconds per tag: sealing (HMAC) alone, and the durable slot write alone."""
    key, n = os.urandom(32), 20_000
    tag = CommitTag(1, 123_456, "ab" * 32)
    started = time.perf_counter()
    for _ in range(n):
        _tags.seal(key, "bench.local/audit", tag)
    seal = (time.perf_counter() - started) / n * 1e6
    path = root / "slots"
    path.write_bytes(bytes(2 * _tags.SLOT_BYTES))
    fd = os.open(path, os.O_RDWR | os.O_DSYNC)
    data, writes = _tags.seal(key, "bench.local/audit", tag), 500
    try:
        started = time.perf_counter()
        for i in range(writes):
            os.pwrite(fd, data, (i % 2) * _tags.SLOT_BYTES)
        write = (time.perf_counter() - started) / writes * 1e6
    finally:
        os.close(fd)
    return seal, write


def run() -> None:
    import bench.audit_bench as audit_bench

    audit_bench.SECONDS = SECONDS
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "var" if (Path.cwd() / "var").is_dir()
                                     else None) as tmp:
        root = Path(tmp)
        print(f"durable appends/s, {ROUNDS} alternating rounds of {SECONDS:.0f} s, "
              "median (commit tag vs none):")
        for threads in (1, 16, 64):
            rates: dict[str, list[float]] = {"none": [], "tag": []}
            for r in range(ROUNDS):
                for name, cls in (("none", _Untagged), ("tag", AuditLog)):
                    d = root / f"{name}-{threads}-{r}"
                    d.mkdir()
                    rates[name].append(_rate(cls, d, threads))
            base, tagged = (statistics.median(rates[k]) for k in ("none", "tag"))
            print(f"  {threads:2d} appenders: no tag {base:9,.0f}/s ({1e6 / base * threads:7.0f}"
                  f" us/append)  tag {tagged:9,.0f}/s ({1e6 / tagged * threads:7.0f} us/append)"
                  f"  {tagged / base:5.2f}x")
        seal, write = _micro(root)
        print(f"one tag: HMAC seal {seal:.1f} us; durable slot write (pwrite, O_DSYNC) "
              f"{write:.0f} us")


if __name__ == "__main__":
    run()
