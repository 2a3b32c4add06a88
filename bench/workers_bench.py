"""Worker processes (``[server] processes``): CPU the gateway adds per call, and throughput,
with N processes against a plain server of N processes, side by side in one run.

On demo-mlp, batch 1, concurrency 16 (profiled, so anomaly scoring is real), for N = 1 and 2:
  plain     bench/plain_server.py --processes N (insecure: the issue's baseline);
  plain_tls the same with mutual TLS (what the gateway cannot do without);
  gateway   ``gateway serve`` with ``[server] processes = N`` (N = 1: one process, no hub).
Server CPU per call is user + system time of the server process and ALL its descendants
(supervisor, hub, workers) from /proc over the timed part of each load run, divided by its
calls. Added CPU per call = gateway's minus plain's, in µs and in vCPU per 1000 calls/s (µs
per call / 1000). Load comes from bench/load.py in its own process, 16 callers over 8
connections (the kernel gives worker processes whole connections). Rounds alternate
(plain, plain_tls, gateway, ...) and the median of each is reported; the load average is
printed because the machine is shared.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.load import process_tree_cpu
from gateway.devenv import (
    DemoEnv,
    GatewayProcess,
    make_demo_env,
    profile_demo_model,
    start_gateway,
)

CONCURRENCY = 16
CHANNELS = 8
ROUNDS = 3
SECONDS = 3.0
PROCESSES = (1, 2)


def _load(target: str, pid: int, tls: list[str], hub: int = 0) -> dict:
    hub_before = process_tree_cpu(hub) if hub else 0.0
    out = subprocess.run([sys.executable, "-m", "bench.load", target, "--concurrency",
                          str(CONCURRENCY), "--channels", str(CHANNELS), "--seconds",
                          str(SECONDS), "--server-pid", str(pid), *tls],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    calls = max(result["calls"] + result["errors"], 1)
    result["cpu_us"] = result["server_cpu_us"]
    # The hub's part (audit log, shared state, scoring), over the whole load run (warm-up
    # included), so an upper bound of its share.
    result["hub_us"] = (process_tree_cpu(hub) - hub_before) * 1e6 / calls if hub else 0.0
    return result


def _spawn_plain(models: Path, processes: int, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.plain_server", str(models), *args,
                             "--processes", str(processes)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()[-1]


def _median(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds)
            for k in ("throughput", "p50_us", "cpu_us", "hub_us", "errors")}


def _env(root: Path, processes: int) -> DemoEnv:
    env = make_demo_env(root, server={"processes": processes, "runtime_dir": "run"})
    profile_demo_model(env)
    return env


def run() -> None:
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"(2 cores here; the load client shares them)")
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-workers-") as tmp:
        for processes in PROCESSES:
            env = _env(Path(tmp) / f"p{processes}", processes)
            cert, key = env.client_files("scorer")
            tls = ["--ca", str(env.certs / "ca.pem"), "--cert", str(cert), "--key", str(key)]
            plain, plain_target = _spawn_plain(env.models, processes)
            plain_tls, plain_tls_target = _spawn_plain(env.models, processes, str(env.certs))
            gateway: GatewayProcess = start_gateway(env)
            try:
                hub = 0
                if processes > 1:
                    table = json.loads((env.root / "run" / "processes.json").read_text())
                    hub = table["hub"]["pid"]
                sides = {"plain": (plain_target, plain.pid, [], 0),
                         "plain_tls": (plain_tls_target, plain_tls.pid, tls, 0),
                         "gateway": (gateway.target, gateway.proc.pid, tls, hub)}
                rounds: dict[str, list[dict]] = {name: [] for name in sides}
                for _ in range(ROUNDS):
                    for name, (target, pid, args, hub_pid) in sides.items():
                        rounds[name].append(_load(target, pid, args, hub_pid))
                results[processes] = {name: _median(r) for name, r in rounds.items()}
            finally:
                gateway.stop()
                for proc in (plain, plain_tls):
                    proc.terminate()
                    proc.wait()
            _print(processes, results[processes])
    if len(results) == 2:
        one, two = results[1], results[2]
        print("\nprocesses 2 vs 1 (throughput at concurrency 16; on 2 cores the load client "
              "competes for them):")
        for name in ("plain", "plain_tls", "gateway"):
            print(f"  {name:>9}: {two[name]['throughput']:.0f} / {one[name]['throughput']:.0f}"
                  f" = {two[name]['throughput'] / one[name]['throughput']:.2f}x")
    print(f"load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


def _print(processes: int, r: dict[str, dict]) -> None:
    print(f"\nprocesses = {processes}, concurrency {CONCURRENCY}, medians of {ROUNDS} rounds:")
    print(f"{'server':>10} {'calls/s':>9} {'p50 µs':>8} {'CPU µs/call':>12} {'errors':>6}")
    for name, row in r.items():
        print(f"{name:>10} {row['throughput']:>9.0f} {row['p50_us']:>8.0f} "
              f"{row['cpu_us']:>12.0f} {int(row['errors']):>6}")
    gw = r["gateway"]
    if gw["hub_us"]:
        print(f"  of the gateway's CPU per call, the hub (log, state, scoring): at most "
              f"{gw['hub_us']:.0f} µs")
    for base in ("plain", "plain_tls"):
        added = gw["cpu_us"] - r[base]["cpu_us"]
        print(f"  gateway vs {base}: adds {added:.0f} µs CPU per call = {added / 1000:.2f} vCPU "
              f"per 1000 calls/s (target <= 0.25); CPU ratio {gw['cpu_us'] / r[base]['cpu_us']:.2f}"
              f"; throughput {gw['throughput'] / r[base]['throughput']:.2f}x")
