"""The contained child that runs a model on edge inputs (one JSON line per event).

Run as a script by :mod:`gateway.models.robustness`; reads one JSON job on stdin:

    {"model": PATH, "address_space": BYTES, "memory_limit": BYTES, "max_batch": N,
     "repeats": N, "perturbations": N, "epsilon": E, "seed": S, "skip": [case, ...]}

and prints ``{"event": "start", "case": ...}`` before each case and ``{"event": "result",
...}`` after it, flushing each line, so the parent knows which case a crash or hang was in.
The address-space limit is set before ONNX Runtime is imported.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from typing import Any


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _dtype(ort_type: str) -> Any:
    import numpy as np

    table = {"tensor(float)": np.float32, "tensor(double)": np.float64,
             "tensor(float16)": np.float16, "tensor(int8)": np.int8, "tensor(int16)": np.int16,
             "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8,
             "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
             "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}
    return table.get(ort_type)


def _shape(dims: list[Any], batch: int) -> list[int]:
    """Concrete shape: the first dynamic dimension is the batch, other dynamic dims are 1."""
    out = []
    for i, d in enumerate(dims):
        out.append(d if isinstance(d, int) and d >= 0 else (batch if i == 0 else 1))
    return out


def _fill(kind: str, dtype: Any, shape: list[int], rng: Any) -> Any:
    import numpy as np

    dt = np.dtype(dtype)
    if kind == "zeros":
        return np.zeros(shape, dt)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dt) if kind in ("random", "batch") \
            else np.full(shape, kind == "max", dt)
    if kind in ("random", "batch"):
        if dt.kind == "f":
            return rng.normal(size=shape).astype(dt)
        return rng.integers(0, 10, size=shape).astype(dt)  # small: index-like inputs work
    info = np.finfo(dt) if dt.kind == "f" else np.iinfo(dt)
    value = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "min": info.min,
             "max": info.max}[kind]
    return np.full(shape, value, dt)


CASES = ("zeros", "random", "nan", "+inf", "-inf", "min", "max", "batch")


def _feeds(inputs: list[Any], kind: str, batch: int, seed: int) -> dict[str, Any] | None:
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        dt = _dtype(spec.type)
        if dt is None:
            raise ValueError(f"input {spec.name} has unsupported type {spec.type}")
        is_float = np.dtype(dt).kind == "f"
        k = kind
        if kind in ("nan", "+inf", "-inf") and not is_float:
            k = "zeros"  # integer inputs cannot hold these
        feeds[spec.name] = _fill(k, dt, _shape(spec.shape, batch), rng)
    if kind in ("nan", "+inf", "-inf") and not any(
            np.dtype(_dtype(s.type)).kind == "f" for s in inputs):
        return None  # not applicable to this model
    return feeds


def _summary(outputs: list[Any], names: list[str]) -> list[dict[str, Any]]:
    import numpy as np

    out = []
    for name, value in zip(names, outputs, strict=True):
        arr = np.ascontiguousarray(value)
        nonfinite = int(np.size(arr) - np.count_nonzero(np.isfinite(arr))) \
            if arr.dtype.kind == "f" else 0
        out.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                    "nonfinite": nonfinite, "sha256": hashlib.sha256(arr.tobytes()).hexdigest()})
    return out


def _sensitivity(sess: Any, inputs: list[Any], names: list[str], job: dict[str, Any],
                 base: dict[str, Any], base_out: list[Any]) -> dict[str, Any]:
    """Output change per input change under small random perturbations of float inputs."""
    import numpy as np

    rng = np.random.default_rng(job["seed"] + 1)
    gains, rel = [], []
    for _ in range(job["perturbations"]):
        feeds, dx2, x2 = {}, 0.0, 0.0
        for spec in inputs:
            x = base[spec.name]
            if x.dtype.kind == "f":
                step = (job["epsilon"] * (np.abs(x) + job["epsilon"])
                        * rng.normal(size=x.shape)).astype(x.dtype)
                feeds[spec.name] = x + step
                dx2 += float(np.sum(np.square(step, dtype=np.float64)))
                x2 += float(np.sum(np.square(x, dtype=np.float64)))
            else:
                feeds[spec.name] = x
        if dx2 == 0:
            return {"max_gain": None, "note": "no float inputs to perturb"}
        out = sess.run(names, feeds)
        dy2 = y2 = 0.0
        for a, b in zip(out, base_out, strict=True):
            if np.asarray(a).dtype.kind in "fiu":
                d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
                dy2 += float(np.sum(np.square(d)))
                y2 += float(np.sum(np.square(np.asarray(b, dtype=np.float64))))
        gains.append(float(np.sqrt(dy2 / dx2)))
        if y2 > 0 and x2 > 0:
            rel.append(float(np.sqrt(dy2 / y2) / np.sqrt(dx2 / x2)))
    finite = [g for g in gains if np.isfinite(g)]
    return {"epsilon": job["epsilon"], "perturbations": len(gains),
            "max_gain": max(finite) if finite else None,
            "median_gain": float(np.median(finite)) if finite else None,
            "max_relative_gain": max(rel) if rel else None,
            "nonfinite_changes": len(gains) - len(finite)}


def main() -> int:
    job = json.loads(sys.stdin.readline())
    limit = int(job["address_space"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np

    from gateway.models.scan import session_options

    opts = session_options(int(job["memory_limit"]), 1, 1)
    _emit(event="start", case="load")
    started = time.perf_counter()
    try:
        from pathlib import Path

        from gateway.models import runtime_from_dir

        runtime = runtime_from_dir(Path(job["model"]).parent)
        sess = runtime.session(opts)
    except Exception as err:
        _emit(event="result", case="load", status="error", seconds=time.perf_counter() - started,
              error=f"{type(err).__name__}: {err}"[:2000])
        _emit(event="done")
        return 0
    inputs, names = sess.get_inputs(), [o.name for o in sess.get_outputs()]
    _emit(event="result", case="load", status="ok", seconds=time.perf_counter() - started,
          inputs=[{"name": i.name, "type": i.type, "shape": [d if isinstance(d, int) else None
                                                             for d in i.shape]} for i in inputs])
    for kind in CASES:
        if kind in job["skip"]:
            continue
        _emit(event="start", case=kind)
        started = time.perf_counter()
        try:
            batch = job["max_batch"] if kind == "batch" else 1
            feeds = _feeds(inputs, kind, batch, job["seed"])
            if feeds is None:
                _emit(event="result", case=kind, status="skipped", seconds=0.0,
                      detail="no float input")
                continue
            out = sess.run(names, feeds)
            result: dict[str, Any] = {"outputs": _summary(out, names)}
            if kind in ("random", "batch"):
                digests = [[o["sha256"] for o in result["outputs"]]]
                for _ in range(job["repeats"] - 1):
                    digests.append([o["sha256"] for o in _summary(sess.run(names, feeds),
                                                                   names)])
                if kind == "random":
                    fresh = runtime.session(opts)
                    digests.append([o["sha256"] for o in _summary(fresh.run(names, feeds),
                                                                   names)])
                    del fresh
                result["runs"] = len(digests)
                result["deterministic"] = all(d == digests[0] for d in digests)
                if kind == "random":
                    result["sensitivity"] = _sensitivity(sess, inputs, names, job, feeds, out)
            _emit(event="result", case=kind, status="ok",
                  seconds=time.perf_counter() - started, **result)
        except MemoryError as err:
            _emit(event="result", case=kind, status="error", seconds=time.perf_counter() - started,
                  error=f"MemoryError: {err}")
        except Exception as err:
            _emit(event="result", case=kind, status="error", seconds=time.perf_counter() - started,
                  error=f"{type(err).__name__}: {err}"[:2000])
    _emit(event="done")
    del np
    return 0


if __name__ == "__main__":
    sys.exit(main())
