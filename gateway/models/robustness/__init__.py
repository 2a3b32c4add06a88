"""Robustness tests: run a model on edge inputs in a contained process, under limits.

    from gateway.models.robustness import run_model_tests
    report = run_model_tests(Path("models/iris/1"))      # a JSON-ready dict
    report["passed"], report["failures"]

The model is first admission-scanned (a refused model is never run). Then a child process,
with an address-space limit (``RLIMIT_AS``) and ONNX Runtime's capped arena, runs it on
zeros, seeded random values, NaN, +/-infinity, the dtype's extremes and the largest batch,
each case under a time limit; a crash or hang is contained in the child, attributed to its
case, and the remaining cases run in a fresh child. Determinism: the same input must give
bit-identical outputs across repeated runs and a fresh session. Sensitivity: the ratio of
output change to input change under small random perturbations is reported.

Failures: a crash, a hang, running out of memory, an error on ordinary inputs (zeros,
random, largest batch), or non-determinism. A clean error on NaN, infinity or extremes is
acceptable (the request fails; the server lives) and is reported as ``rejected``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.models.robustness import _worker
from gateway.models.scan import ScanSettings, scan_model

__all__ = ["RobustnessSettings", "run_model_tests"]

_ORDINARY = ("zeros", "random", "batch")
_MEMORY_WORDS = ("allocate", "bad_alloc", "memoryerror", "out of memory", "available memory")
_STARTUP_SECONDS = 30.0


@dataclass(frozen=True)
class RobustnessSettings:
    """Limits and sizes of `gateway model test` (the ``[robustness]`` config table)."""

    #: Seconds each case (and loading the model) may take before it counts as a hang.
    time_limit: float = 10.0
    #: ONNX Runtime arena cap in the child, in bytes.
    memory_limit_bytes: int = 1024**3
    #: Address-space limit (RLIMIT_AS) of the child, in bytes: the hard backstop.
    address_space_bytes: int = 4 * 1024**3
    #: Batch size of the largest-batch case (the largest batch the gateway admits).
    max_batch: int = 64
    #: Runs of the same input compared for determinism (plus one in a fresh session).
    repeats: int = 3
    #: Perturbations and their relative size for the sensitivity report.
    perturbations: int = 8
    epsilon: float = 1e-3
    seed: int = 0


_DEFAULT = RobustnessSettings()
_DEFAULT_SCAN = ScanSettings()


def run_model_tests(version_dir: Path, settings: RobustnessSettings = _DEFAULT, *,
               scan_settings: ScanSettings = _DEFAULT_SCAN) -> dict[str, Any]:
    """Scan, then run the edge cases in a contained child; return the JSON-ready report."""
    version_dir = Path(version_dir)
    scan = scan_model(version_dir, scan_settings)
    report: dict[str, Any] = {"path": str(version_dir), "passed": False, "failures": [],
                              "limits": asdict(settings), "scan": scan.to_json(), "cases": []}
    if scan.refused:
        report["failures"] = [f"refused by the admission scanner: {f.code}: {f.message}"
                              for f in scan.sorted_findings() if f.severity == "high"]
        return report
    results = _run_cases(version_dir / "model.onnx", settings)
    report["cases"] = results
    _judge(report, results)
    report["passed"] = not report["failures"]
    return report


def _run_cases(model: Path, settings: RobustnessSettings) -> list[dict[str, Any]]:
    """Run every case, restarting the child after a crash; a hang ends the run.

    Why stop at a hang: each further case would wait out the time limit again, and one hang
    already fails the model.
    """
    results: list[dict[str, Any]] = []
    done: set[str] = set()
    for _attempt in range(len(_worker.CASES) + 2):
        batch: list[dict[str, Any]] = []
        finished, stopped_in = _one_worker(model, settings, sorted(done), batch)
        # Each child reloads the model; keep only the first load's result.
        results += [r for r in batch if not (r["case"] == "load" and r["status"] == "ok"
                                             and "load" in done)]
        done.update(r["case"] for r in batch)
        if finished or stopped_in in (None, "load") or batch[-1]["status"] == "timeout":
            break
    for case in _worker.CASES:
        if case not in done and any(r["status"] == "timeout" for r in results):
            results.append({"case": case, "status": "not-run", "seconds": 0.0,
                            "error": "not run after a hang"})
    return results


def _one_worker(model: Path, settings: RobustnessSettings, skip: list[str],
                results: list[dict[str, Any]]) -> tuple[bool, str | None]:
    """Run one child until it finishes, crashes or hangs; returns (finished, case it died in)."""
    job = {"model": str(model.resolve()), "address_space": settings.address_space_bytes,
           "memory_limit": settings.memory_limit_bytes, "max_batch": settings.max_batch,
           "repeats": max(1, settings.repeats), "perturbations": settings.perturbations,
           "epsilon": settings.epsilon, "seed": settings.seed, "skip": skip}
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([sys.executable, "-I", _worker.__file__], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(job) + "\n").encode())
        proc.stdin.close()
        reader = _Lines(proc.stdout.fileno())
        current: str | None = None
        started = time.monotonic()
        deadline = started + _STARTUP_SECONDS + settings.time_limit
        try:
            while True:
                line = reader.next(deadline)
                if line is None:  # deadline passed: a hang
                    proc.kill()
                    proc.wait()
                    results.append({"case": current or "startup", "status": "timeout",
                                    "seconds": round(time.monotonic() - started, 3),
                                    "error": f"no result within {settings.time_limit} s"})
                    return False, current
                if line == b"":  # the child died
                    code = proc.wait()
                    errors.seek(0)
                    tail = errors.read()[-2000:].decode(errors="replace").strip()
                    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                    results.append({"case": current or "startup", "status": "crash",
                                    "seconds": round(time.monotonic() - started, 3),
                                    "error": f"the runtime died ({how})"
                                    + (f": {tail.splitlines()[-1]}" if tail else "")})
                    return False, current
                event = json.loads(line)
                if event["event"] == "start":
                    current = event["case"]
                    started = time.monotonic()
                    deadline = started + settings.time_limit
                elif event["event"] == "result":
                    event.pop("event")
                    event["seconds"] = round(event["seconds"], 4)
                    results.append(event)
                    current = None
                else:
                    proc.wait()
                    return True, None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


class _Lines:
    """Lines from a pipe with a deadline (select, no threads)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""

    def next(self, deadline: float) -> bytes | None:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return b""
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def _judge(report: dict[str, Any], results: list[dict[str, Any]]) -> None:
    failures: list[str] = report["failures"]
    deterministic = []
    for r in results:
        case, status = r["case"], r["status"]
        if status == "ok" and case == "load":
            report["inputs"] = r.get("inputs", [])
        if status in ("crash", "timeout"):
            failures.append(f"{case}: {status}: {r['error']}")
        elif status == "error":
            error = r.get("error", "")
            if any(w in error.lower() for w in _MEMORY_WORDS):
                r["status"] = "memory"
                failures.append(f"{case}: exceeded the memory limit: {error[:300]}")
            elif case in _ORDINARY or case == "load":
                failures.append(f"{case}: the model fails on ordinary inputs: {error[:300]}")
            else:
                r["status"] = "rejected"
        if "deterministic" in r:
            deterministic.append(r["deterministic"])
            if not r["deterministic"]:
                failures.append(f"{case}: non-deterministic: the same input gave different "
                                f"outputs across {r['runs']} runs")
        if "sensitivity" in r:
            report["sensitivity"] = r.pop("sensitivity")
    report["determinism"] = {"checked_cases": len(deterministic),
                             "deterministic": bool(deterministic) and all(deterministic)}
    ran = {r["case"] for r in results}
    missing = [c for c in ("load", *_ORDINARY) if c not in ran]
    if missing and not failures:
        failures.append(f"cases not run: {', '.join(missing)}")
