"""The price of the gateway on the request path, measured side by side in one run.

On demo-mlp with batch 1 (demo-mlp profiled on N(0, 1) data, so anomaly scoring is real):
  (a) ONNX Runtime in-process: the floor;
  (b) a plain insecure gRPC server doing the same ModelInfer (bench/plain_server.py);
  (b') the same plain server with mutual TLS: the price of mTLS alone;
  (f) the same plain server with mutual TLS and one durable audit record per call, through
      the gateway's own AuditLog: the floor that the core's requirements set, before any of
      the gateway's own work (identity, policy, quota, scoring, the full record);
  (b'') the same plain work on grpc.aio: how much of the baseline is the threaded server;
  (c) the gateway: mutual TLS, identity, policy, quotas, anomaly scoring, durable audit;
  (c') the gateway with anomaly scoring off (issue 6's on/off comparison).
Load comes from a separate client process (bench/load.py). Each configuration runs in
alternating rounds (b, c, b, c, ...) and the median round is reported, so drift on this
shared machine hits both sides alike. To say what limits c/b, it also prints the audit disk's
durable-write floor and one call's cost split without gRPC (bench/handler_cost.py).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.devenv import DemoEnv, make_demo_env, profile_demo_model, start_gateway

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


def _flush_floor(directory: Path, gap_s: float = 0.0, writes: int = 300) -> float:
    """p50 µs of one durable 1 kB write (O_DSYNC pwrite into zero-written space, as the audit
    store writes) where the audit log lives: the least an allowed call's record adds to its
    latency. ``gap_s`` idles between writes, as calls at concurrency 1 do: on a virtual disk
    a write after an idle gap costs more than one right after another."""
    path = directory / "flush-floor.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DSYNC, 0o600)
    try:
        os.pwrite(fd, bytes(writes * 1024), 0)
        record = b"x" * 1023 + b"\n"
        latencies = []
        for i in range(writes):
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter_ns()
            os.pwrite(fd, record, i * len(record))
            latencies.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(latencies) / 1000


def _handler_cost(root: Path) -> dict:
    """bench/handler_cost.py on its own fresh deployment (its own audit log and process)."""
    env = _profiled_env(root)
    out = subprocess.run([sys.executable, "-m", "bench.handler_cost", str(env.config)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _profiled_env(root: Path, **overrides) -> DemoEnv:
    """A demo deployment whose demo-mlp carries a signed reference profile."""
    env = make_demo_env(root, **overrides)
    profile_demo_model(env)
    return env


def _load(target: str, concurrency: int, tls: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.load", target, "--concurrency",
                          str(concurrency), "--seconds", str(SECONDS), *tls],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds)
            for k in ("throughput", "p50_us", "p99_us", "errors")}


def _side_by_side(b: tuple[str, list[str]], c: tuple[str, list[str]],
                  concurrency: int) -> tuple[dict, dict]:
    b_rounds, c_rounds = [], []
    for _ in range(ROUNDS):
        b_rounds.append(_load(b[0], concurrency, b[1]))
        c_rounds.append(_load(c[0], concurrency, c[1]))
    return _median(b_rounds), _median(c_rounds)


def _row(label: str, b: dict, c: dict) -> str:
    return (f"{label:>6} {b['throughput']:>9.0f} {c['throughput']:>9.0f} "
            f"{c['throughput'] / b['throughput']:>6.2f} {b['p50_us']:>8.0f} {c['p50_us']:>8.0f} "
            f"{c['p50_us'] / b['p50_us']:>6.2f} {b['p99_us']:>8.0f} {c['p99_us']:>8.0f} "
            f"{int(b['errors'] + c['errors']):>6}")


_HEADER = (f"{'conc':>6} {'b call/s':>9} {'c call/s':>9} {'c/b':>6} {'b p50µs':>8} "
           f"{'c p50µs':>8} {'c/b':>6} {'b p99µs':>8} {'c p99µs':>8} {'errors':>6}")


def _section(title: str, b: tuple[str, list[str]], c: tuple[str, list[str]],
             concurrencies: tuple[int, ...]) -> dict[int, tuple[dict, dict]]:
    """Print one side-by-side table (b against c); return its rows by concurrency."""
    print(f"\n{title}")
    print(_HEADER)
    rows = {}
    for concurrency in concurrencies:
        rows[concurrency] = _side_by_side(b, c, concurrency)
        print(_row(str(concurrency), *rows[concurrency]), flush=True)
    return rows


def _spawn_plain(*args: str) -> tuple[subprocess.Popen, str]:
    """Start bench/plain_server.py with ``args``; return it and the address it listens on."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.plain_server", *args],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().split()[-1]


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        env = _profiled_env(Path(tmp) / "on")
        env_off = _profiled_env(Path(tmp) / "off", monitor={"metrics_listen": "127.0.0.1:0",
                                                            "scoring": False})
        # The floor writes its own audit log (one writer per log), with the gateway's settings.
        floor_env = make_demo_env(Path(tmp) / "floor")
        gateway, gateway_off = start_gateway(env), start_gateway(env_off)
        servers: list[subprocess.Popen] = []
        try:
            targets = {}
            for name, args in (("plain", ()), ("plain_tls", (str(env.certs),)),
                               ("plain_aio", ("--aio",)),
                               ("floor", (str(env.certs), "--audit", str(floor_env.config)))):
                proc, targets[name] = _spawn_plain(str(env.models), *args)
                servers.append(proc)
            cert, key = env.client_files("scorer")
            tls = ["--ca", str(env.certs / "ca.pem"), "--cert", str(cert), "--key", str(key)]
            cert, key = env_off.client_files("scorer")
            tls_off = ["--ca", str(env_off.certs / "ca.pem"), "--cert", str(cert),
                       "--key", str(key)]
            plain, plain_tls = (targets["plain"], []), (targets["plain_tls"], tls)
            floor, full = (targets["floor"], tls), (gateway.target, tls)

            ort_only = _in_process(env.models / "demo-mlp/1/model.onnx")
            print(f"(a) ONNX Runtime in-process: {ort_only['throughput']:.0f} calls/s, "
                  f"p50 {ort_only['p50_us']:.0f} µs, p99 {ort_only['p99_us']:.0f} µs")

            rows = _section("b = plain insecure gRPC server, c = gateway (mTLS, policy, "
                            "scoring, durable audit)", plain, full, CONCURRENCY)
            print("targets: c/b throughput at concurrency 16 >= 0.80; "
                  "c/b p50 at concurrency 1 <= 1.30")
            plain_p50 = rows[1][0]["p50_us"]
            busy, idle = _flush_floor(env.audit), _flush_floor(env.audit, gap_s=0.001)
            print(f"durable-write floor on the audit log's disk: one O_DSYNC write p50 "
                  f"{busy:.0f} µs back to back, {idle:.0f} µs after 1 ms idle (the pace of "
                  f"concurrency 1) = {idle / plain_p50:.2f}x of b's p50 at concurrency 1, so "
                  f"c/b p50 >= {1 + idle / plain_p50:.2f} before any gateway code runs")

            cost = _handler_cost(Path(tmp) / "handlers")
            plain_us, full_us = cost["plain"]["p50_us"], cost["gateway"]["p50_us"]
            no_write_us = cost["gateway_no_write"]["p50_us"]
            print(f"\none call without gRPC (handlers called directly, concurrency 1, p50): "
                  f"plain {plain_us:.0f} µs; gateway {full_us:.0f} µs = plain + "
                  f"{no_write_us - plain_us:.0f} µs of gateway work (identity, policy, quota, "
                  f"scoring, metrics, building the record) + {full_us - no_write_us:.0f} µs "
                  "of durable audit write")

            _section("b = plain insecure (threaded gRPC server), c = the same plain server on "
                     "grpc.aio (reference: the baseline's own server stack)",
                     plain, (targets["plain_aio"], []), (16,))
            _section("b = plain insecure, c = plain with mutual TLS (the price of mTLS alone)",
                     plain, plain_tls, (1, 16))
            rows = _section("b = plain insecure, c = the floor: plain with mutual TLS and one "
                            "durable audit record per call\n(the gateway's AuditLog; no "
                            "identity, policy, quota, scoring; a two-field record)",
                            plain, floor, (1, 16))
            (b1, c1), (b16, c16) = rows[1], rows[16]
            print(f"the floor against the targets: p50 at concurrency 1 "
                  f"{c1['p50_us'] / b1['p50_us']:.2f}x (target <= 1.30), throughput at "
                  f"concurrency 16 {c16['throughput'] / b16['throughput']:.2f}x "
                  "(target >= 0.80)")
            _section("b = the floor, c = gateway (the price of the gateway's own work: "
                     "identity, policy, quota, scoring, metrics, the full record)",
                     floor, full, (1, 16))
            _section("b = gateway with anomaly scoring off, c = scoring on",
                     (gateway_off.target, tls_off), full, (16,))
            print("target: scoring overhead <= 5% at concurrency 16 (c/b throughput >= 0.95)")
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait()
            gateway.stop()
            gateway_off.stop()
