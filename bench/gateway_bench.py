"""Issue 2's benchmark: the price of mTLS + policy + durable audit on the request path.

Side by side in one run, on demo-mlp with batch 1:
  (a) ONNX Runtime in-process (the floor),
  (b) a plain insecure gRPC server doing the same ModelInfer (bench/plain_server.py),
  (c) the gateway: mutual TLS, policy, durable group-committed audit.
Load comes from a separate client process (bench/load.py) at concurrency 1, 4 and 16; each
configuration runs in alternating rounds (b, c, b, c, ...) and the median round is reported,
so drift on this shared machine hits both sides alike.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.devenv import make_demo_env, start_gateway

CONCURRENCY = (1, 4, 16)
ROUNDS = 3
SECONDS = 3.0


def _in_process(model: Path, seconds: float = 2.0) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    for _ in range(200):
        session.run(None, {"input": x})
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        session.run(None, {"input": x})
        latencies.append(time.perf_counter_ns() - t0)
    lat = np.array(latencies) / 1000
    return {"throughput": len(lat) / seconds, "p50_us": float(np.percentile(lat, 50)),
            "p99_us": float(np.percentile(lat, 99))}


def _load(target: str, concurrency: int, tls: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.load", target, "--concurrency",
                          str(concurrency), "--seconds", str(SECONDS), *tls],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in ("throughput", "p50_us",
                                                                  "p99_us", "errors")}


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        env = make_demo_env(Path(tmp) / "env")
        gateway = start_gateway(env)
        plain = subprocess.Popen([sys.executable, "-m", "bench.plain_server", str(env.models)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            plain_target = plain.stdout.readline().split()[-1]
            cert, key = env.client_files("scorer")
            tls = ["--ca", str(env.certs / "ca.pem"), "--cert", str(cert), "--key", str(key)]
            floor = _in_process(env.models / "demo-mlp/1/model.onnx")
            print(f"(a) ONNX Runtime in-process: {floor['throughput']:.0f} calls/s, "
                  f"p50 {floor['p50_us']:.0f} µs, p99 {floor['p99_us']:.0f} µs")
            print(f"{'conc':>4} {'plain calls/s':>14} {'gateway calls/s':>16} {'c/b':>6} "
                  f"{'plain p50':>10} {'gw p50':>8} {'c/b':>6} {'plain p99':>10} {'gw p99':>8}"
                  f" {'errors':>6}")
            for concurrency in CONCURRENCY:
                b_rounds, c_rounds = [], []
                for _ in range(ROUNDS):
                    b_rounds.append(_load(plain_target, concurrency, []))
                    c_rounds.append(_load(gateway.target, concurrency, tls))
                b, c = _median(b_rounds), _median(c_rounds)
                print(f"{concurrency:>4} {b['throughput']:>14.0f} {c['throughput']:>16.0f} "
                      f"{c['throughput'] / b['throughput']:>6.2f} {b['p50_us']:>9.0f}µ "
                      f"{c['p50_us']:>7.0f}µ {c['p50_us'] / b['p50_us']:>6.2f} "
                      f"{b['p99_us']:>9.0f}µ {c['p99_us']:>7.0f}µ "
                      f"{int(b['errors'] + c['errors']):>6}", flush=True)
            print("targets: c/b throughput at concurrency 16 >= 0.80; "
                  "c/b p50 at concurrency 1 <= 1.30")
        finally:
            plain.terminate()
            plain.wait()
            gateway.stop()
