"""The CPU the gateway adds per call, and a realistic model (issue 18's benchmarks).

    python -m bench cpu

Every figure is a ratio of servers measured side by side in one run, in alternating rounds
(plain, floor, gateway, plain, ...), so drift on this shared machine hits each alike:

* **Added CPU per call** at concurrency 16 on demo-mlp: the server's CPU time (user +
  system of the process and its descendants, read from /proc at the start and end of the
  measured window; bench/load.py) per call, gateway minus the plain server's, in µs and as
  vCPU per 1000 calls/s (µs per call / 1000), with the CPU ratio and the throughput ratio.
  Beside them run the plain server with mutual TLS and the floor (below), so the added CPU
  is split into mTLS, the durable record and the gateway's own work.
* **p50 at concurrency 1**: the gateway against the floor (the plain server with mutual TLS
  and one durable audit record per call through the gateway's own AuditLog,
  bench/plain_server.py --audit).
* **The default handler threads against the former 16**: the gateway runs
  ``[server] threads`` (the default, fewer than the 16 callers: a thread that finishes takes
  the next queued call without sleeping, and fewer threads contend for the GIL); beside it
  the gateway with :data:`OLD_THREADS` threads (the former default, with the former limits)
  and the plain server with as many threads as the default gateway (``--workers``), so
  the pool sizes also compare like with like.
* **A realistic model**: ``bench-mlp``, a deep MLP built at set-up like the demo models
  (onnx.helper, seeded weights, signed, profiled on N(0, 1) reference data so it is scored)
  whose one call takes about 1-2 ms of inference here; gateway against plain, throughput at
  concurrency 16 and p50 at concurrency 1.

The machine's load average is printed with each table: other work on it moves every figure.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gateway.config import ServerSettings
from gateway.devenv import DemoEnv, make_demo_env, run_cli, start_gateway
from gateway.models.demo import IR_VERSION, OPSET

_REPO = Path(__file__).resolve().parent.parent
ROUNDS = 5
SECONDS = 3.0
#: The realistic model: input width and hidden layers.
BENCH_FEATURES = 64
BENCH_HIDDEN = (1024,) * 10
BENCH_MODEL = "bench-mlp"
#: Targets of issue 18.
TARGET_ADDED_VCPU = 0.25
TARGET_FLOOR_P50 = 1.10
TARGET_REAL_THROUGHPUT = 0.90
TARGET_REAL_P50 = 1.15
#: Handler threads of the default gateway, and of the gateway before they were split from
#: ``workers`` (with the limits it had then: 8 calls per identity, 4 streams).
THREADS = ServerSettings().threads
OLD_THREADS = 16


def deep_mlp(features: int = BENCH_FEATURES, hidden: tuple[int, ...] = BENCH_HIDDEN,
             classes: int = 10, seed: int = 11) -> bytes:
    """``softmax(relu(... relu(x W1 + b1) ...) Wk + bk)``: a dense classifier of realistic
    cost (a few million multiply-adds a row), built with onnx.helper like the demo models."""
    rng = np.random.default_rng(seed)
    widths = (features, *hidden, classes)
    inits, nodes, last = [], [], "input"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        inits += [numpy_helper.from_array(
                      rng.normal(0, 1 / np.sqrt(n_in), (n_in, n_out)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [last, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        last = f"a{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [last], [f"r{i}"]))
            last = f"r{i}"
    nodes.append(helper.make_node("Softmax", [last], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes, BENCH_MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                       ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="gateway-bench")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def add_bench_model(env: DemoEnv) -> None:
    """Put ``bench-mlp`` in ``env``'s repository: profiled on seeded N(0, 1) rows, signed with
    the demo signer, and allowed to the demo scorers by one more policy line."""
    version = env.models / BENCH_MODEL / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(deep_mlp())
    (version / "metadata.toml").write_text('owner = "team-bench"\n')
    reference = np.random.default_rng(0).normal(0, 1, (4000, BENCH_FEATURES))
    np.save(env.root / "bench-ref.npy", reference.astype(np.float32))
    run_cli("model", "profile", str(version), "--data", str(env.root / "bench-ref.npy"))
    run_cli("model", "sign", str(version), "--key",
            str(env.certs / "signing" / "demo-signer.key"))
    with (env.policies / "policy.csv").open("a") as policy:
        policy.write(f"\np, role:scorers, {BENCH_MODEL}, infer, allow\n")


class Server:
    """One server under load: its address, the pid whose CPU is counted, TLS flags."""

    def __init__(self, name: str, target: str, pid: int, tls: list[str]) -> None:
        self.name, self.target, self.pid, self.tls = name, target, pid, tls

    def load(self, concurrency: int, model: str = "demo-mlp", features: int = 4) -> dict:
        out = subprocess.run([sys.executable, "-m", "bench.load", self.target,
                              "--concurrency", str(concurrency), "--seconds", str(SECONDS),
                              "--server-pid", str(self.pid), "--model", model,
                              "--features", str(features), *self.tls],
                             capture_output=True, text=True, check=True, cwd=_REPO)
        return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(servers: list[Server], concurrency: int, rounds: int = ROUNDS,
              **model: object) -> list[dict]:
    """Medians over ``rounds`` alternating rounds, one dict per server (same order)."""
    runs: list[list[dict]] = [[] for _ in servers]
    for _ in range(rounds):
        for server, results in zip(servers, runs, strict=True):
            results.append(server.load(concurrency, **model))  # type: ignore[arg-type]
    keys = ("throughput", "p50_us", "p99_us", "server_cpu_us", "server_switches", "errors",
            "load")
    return [{k: statistics.median(r[k] for r in results) for k in keys} for results in runs]


def _spawn_plain(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.plain_server", *args],
                            stdout=subprocess.PIPE, text=True)


def _address(proc: subprocess.Popen) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().split()[-1]


def added_cpu_line(plain: dict, gateway: dict) -> str:
    added = gateway["server_cpu_us"] - plain["server_cpu_us"]
    return (f"added CPU per call at concurrency 16: {added:.0f} µs = {added / 1000:.3f} vCPU "
            f"per 1000 calls/s (target <= {TARGET_ADDED_VCPU}); CPU per call gateway "
            f"{gateway['server_cpu_us']:.0f} µs vs plain {plain['server_cpu_us']:.0f} µs = "
            f"{gateway['server_cpu_us'] / plain['server_cpu_us']:.2f}x; throughput "
            f"{gateway['throughput']:.0f} vs {plain['throughput']:.0f} calls/s = "
            f"{gateway['throughput'] / plain['throughput']:.2f}x")


def _table(title: str, servers: list[Server], rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'server':>10} {'calls/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/call':>12} "
          f"{'errors':>6} {'load':>5}")
    for server, row in zip(servers, rows, strict=True):
        print(f"{server.name:>10} {row['throughput']:>9.0f} {row['p50_us']:>8.0f} "
              f"{row['p99_us']:>8.0f} {row['server_cpu_us']:>12.0f} {int(row['errors']):>6} "
              f"{row['load']:>5.1f}", flush=True)


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-cpu-bench-") as tmp:
        env = make_demo_env(Path(tmp) / "gw")
        add_bench_model(env)
        floor_env = make_demo_env(Path(tmp) / "floor")  # the floor's own log (one writer)
        gateway = start_gateway(env)
        old_env = make_demo_env(Path(tmp) / "old", server={
            "threads": OLD_THREADS, "max_calls_per_identity": 8, "max_streams": 4})
        old = start_gateway(old_env)
        cert, key = env.client_files("scorer")
        tls = ["--ca", str(env.certs / "ca.pem"), "--cert", str(cert), "--key", str(key)]
        procs = [_spawn_plain(str(env.models)), _spawn_plain(str(env.models), str(env.certs)),
                 _spawn_plain(str(env.models), str(env.certs), "--audit", str(floor_env.config)),
                 _spawn_plain(str(env.models), "--workers", str(THREADS))]
        try:
            plain = Server("plain", _address(procs[0]), procs[0].pid, [])
            mtls = Server("mtls", _address(procs[1]), procs[1].pid, tls)
            floor = Server("floor", _address(procs[2]), procs[2].pid, tls)
            gw = Server("gateway", gateway.target, gateway.proc.pid, tls)
            old_cert, old_key = old_env.client_files("scorer")
            old_tls = ["--ca", str(old_env.certs / "ca.pem"), "--cert", str(old_cert),
                       "--key", str(old_key)]
            plain_t = Server(f"plain t{THREADS}", _address(procs[3]), procs[3].pid, [])
            gw_old = Server(f"gw t{OLD_THREADS}", old.target, old.proc.pid, old_tls)
            started = time.monotonic()

            sixteen = [plain, mtls, floor, gw, plain_t, gw_old]
            rows = alternate(sixteen, 16)
            _table("demo-mlp, concurrency 16 (medians of alternating rounds; plain, mtls and "
                   f"floor run {OLD_THREADS} threads; mtls = plain with mutual TLS; floor = "
                   f"mtls + one durable audit record per call; gateway = the defaults, "
                   f"{THREADS} handler threads; t<N> = N handler threads)", sixteen, rows)
            print(added_cpu_line(rows[0], rows[3]))
            cpu = [row["server_cpu_us"] for row in rows]
            print(f"where the added CPU goes: mutual TLS {cpu[1] - cpu[0]:.0f} µs, the durable "
                  f"audit record {cpu[2] - cpu[1]:.0f} µs (together the floor, "
                  f"{(cpu[2] - cpu[0]) / 1000:.3f} vCPU per 1000 calls/s), the gateway's own "
                  f"work (identity, policy, quota, scoring, metrics, the full record, the "
                  f"receipt) {cpu[3] - cpu[2]:.0f} µs")
            print(f"like with like, {THREADS} handler threads (gateway and plain alike): "
                  + added_cpu_line(rows[4], rows[3]))
            print(f"like with like, {OLD_THREADS} handler threads (gateway and plain alike): "
                  + added_cpu_line(rows[0], rows[5]))
            print(f"the default ({THREADS} threads) against the former {OLD_THREADS}: CPU per "
                  f"call {rows[3]['server_cpu_us']:.0f} against {rows[5]['server_cpu_us']:.0f} "
                  f"µs ({rows[3]['server_cpu_us'] / rows[5]['server_cpu_us']:.2f}x), "
                  f"throughput {rows[3]['throughput'] / rows[5]['throughput']:.2f}x, p50 "
                  f"{rows[3]['p50_us'] / rows[5]['p50_us']:.2f}x")

            ones = [plain, floor, gw, gw_old]
            rows1 = alternate(ones, 1)
            _table("demo-mlp, concurrency 1", ones, rows1)
            print(f"p50 at concurrency 1: gateway {rows1[2]['p50_us']:.0f} µs vs the floor "
                  f"(plain + mTLS + one durable write) {rows1[1]['p50_us']:.0f} µs = "
                  f"{rows1[2]['p50_us'] / rows1[1]['p50_us']:.2f}x "
                  f"(target <= {TARGET_FLOOR_P50}); vs plain "
                  f"{rows1[2]['p50_us'] / rows1[0]['p50_us']:.2f}x")

            model = {"model": BENCH_MODEL, "features": BENCH_FEATURES}
            real16 = alternate([plain, gw], 16, **model)
            _table(f"{BENCH_MODEL} (realistic model), concurrency 16", [plain, gw], real16)
            real1 = alternate([plain, gw], 1, **model)
            _table(f"{BENCH_MODEL}, concurrency 1", [plain, gw], real1)
            print(f"realistic model: throughput at concurrency 16 "
                  f"{real16[1]['throughput'] / real16[0]['throughput']:.2f}x "
                  f"(target >= {TARGET_REAL_THROUGHPUT}); p50 at concurrency 1 "
                  f"{real1[1]['p50_us'] / real1[0]['p50_us']:.2f}x "
                  f"(target <= {TARGET_REAL_P50}); inference alone p50 (plain, c1) "
                  f"{real1[0]['p50_us']:.0f} µs end to end")
            print(f"({time.monotonic() - started:.0f} s of load; load average now "
                  f"{os.getloadavg()[0]:.1f})")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
            gateway.stop()
            old.stop()
