"""Why the gateway's extra CPU per call grows with the model (issue 18, bench-mlp).

    python -m bench.mlp_cost             # two tables, in process, no gRPC

Both parts run in this one process, in alternating rounds, and count the calling thread's
CPU time (``time.thread_time_ns``), so other processes on the machine move every row alike:

1. **Session options**: ``bench-mlp`` (bench/cpu_bench.py) run alone under the plain
   server's session options, the gateway's (``gateway.models.scan.session_options``: the
   capped environment arena, initializers in it, no spinning), and the gateway's without
   each of those entries in turn, and without all three. Same model bytes, same input, one row.
2. **Cold caches**: the plain and gateway ModelInfer handlers (bench/handler_cost.py's set-up:
   identity, policy, quota, scoring, the durable record) on ``demo-mlp``, whose inference
   is tiny, each call either straight after the previous one ("warm") or after reading a
   40 MiB array, as much memory as bench-mlp's weights ("swept"). bench-mlp's inference
   streams its weights through the caches on every call, so the handler's own work runs
   from cold caches there; the swept rows measure that cost without the inference.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.cpu_bench import BENCH_FEATURES, add_bench_model, deep_mlp

ROUNDS = 6
RUNS = 300
CALLS = 600
#: As many bytes as bench-mlp's weights (10 x 1024 x 1024 float32, plus the first layer).
SWEEP_BYTES = 40 << 20
#: The gateway's session options' config entries, each left out in turn by part 1.
ENTRIES = ("session.use_env_allocators", "session.use_device_allocator_for_initializers",
           "session.intra_op.allow_spinning")


def _thread_us(fn: Callable[[], object], n: int, before: Callable[[], object] | None = None
               ) -> float:
    """Mean CPU time of the calling thread per ``fn()``, ``before()`` run untimed each time."""
    total = 0
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.thread_time_ns()
        fn()
        total += time.thread_time_ns() - t0
    return total / n / 1000


def _options(drop: str = "") -> ort.SessionOptions:
    from gateway.models.scan import ScanSettings, session_options

    # The deployment's own cap: the arena is registered once per process (part 2 reuses it).
    base = session_options(memory_limit_bytes=ScanSettings().session_memory_bytes,
                           intra_op_threads=1, inter_op_threads=1)
    if not drop:
        return base
    # The same options rebuilt without one entry (SessionOptions cannot remove one).
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key in ENTRIES:
        if drop != "all" and key != drop:
            options.add_session_config_entry(key, base.get_session_config_entry(key))
    if drop in ("all", "session.intra_op.allow_spinning"):
        return options
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def session_options_table() -> None:
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = plain.inter_op_num_threads = 1
    variants = {"plain server": plain, "gateway": _options()}
    variants.update({f"gateway - {key.split('.', 1)[1]}": _options(key) for key in ENTRIES})
    variants["gateway - all three"] = _options("all")
    model = deep_mlp()
    x = np.random.default_rng(0).normal(0, 1, (1, BENCH_FEATURES)).astype(np.float32)
    sessions = {name: ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
                for name, options in variants.items()}
    runs: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(ROUNDS):
        for name, session in sessions.items():
            session.run(None, {"input": x})

            def once(s: ort.InferenceSession = session) -> object:
                return s.run(None, {"input": x})

            runs[name].append(_thread_us(once, RUNS))
    print(f"\nbench-mlp inference alone, CPU µs per run (median of {ROUNDS} alternating "
          f"rounds of {RUNS}; load {os.getloadavg()[0]:.1f})")
    for name, values in runs.items():
        print(f"{name:>52} {statistics.median(values):7.0f}  "
              f"({' '.join(f'{v:.0f}' for v in values)})")


def cold_cache_table() -> None:
    from bench.handler_cost import _Context
    from bench.load import _request
    from bench.plain_server import PlainServicer, _load
    from gateway.config import load_config
    from gateway.devenv import make_demo_env
    from gateway.server import Gateway
    from gateway.server._oip import InferenceServicer

    root = Path(tempfile.mkdtemp(prefix="gateway-mlp-cost-"))
    env = make_demo_env(root / "gw")
    add_bench_model(env)
    config = load_config(env.config)
    gateway = Gateway.start(config)
    context = _Context((config.tls.ca.parent / "clients" / "scorer.pem").read_bytes())
    request = _request()
    handlers = {
        "plain": PlainServicer(_load(str(config.models.repository))).ModelInfer,
        "gateway": InferenceServicer(
            gateway.guard, max_tensor_elements=config.server.max_tensor_elements).ModelInfer}
    sweep = np.ones(SWEEP_BYTES // 4, np.float32)
    rows: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS // 2):
        for name, handler in handlers.items():
            for label, before in (("warm", None), ("swept", sweep.sum)):

                def call(h: Callable[..., object] = handler) -> object:
                    return h(request, context)

                rows.setdefault((name, label), []).append(_thread_us(call, CALLS, before))
    print(f"\ndemo-mlp ModelInfer handler, CPU µs per call of the calling thread (median of "
          f"{ROUNDS // 2} alternating rounds of {CALLS}; swept = after reading "
          f"{SWEEP_BYTES >> 20} MiB; load {os.getloadavg()[0]:.1f})")
    for (name, label), values in rows.items():
        print(f"{name:>8} {label:>6} {statistics.median(values):7.0f}  "
              f"({' '.join(f'{v:.0f}' for v in values)})")
    sys.stdout.flush()
    # A throw-away deployment: removed, and left without signing a checkpoint over its log.
    shutil.rmtree(root, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    session_options_table()
    cold_cache_table()
