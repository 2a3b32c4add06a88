"""Load generator for `make bench`, run as its own process so it does not share the GIL.

    python -m bench.load TARGET --concurrency 16 --seconds 3 [--ca CA --cert C --key K]
                            [--model NAME --features N] [--server-pid PID]

Drives ModelInfer on demo-mlp (or ``--model``, one FP32 input of ``--features`` columns)
with a grpc.aio client (N concurrent callers on one event loop) and prints one JSON line:
calls, errors, seconds, throughput, p50 and p99 in µs. With ``--server-pid`` it also
prints ``server_cpu_us``: the CPU time (user + system, from /proc) that process and all its
descendants spent over the measured window (warm-up excluded), per call, and
``server_switches``: the voluntary context switches of that process's threads per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import grpc
import numpy as np

from gateway._proto.inference import grpc_service_pb2 as pb
from gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc


def _request(model: str = "demo-mlp", features: int = 4) -> pb.ModelInferRequest:
    x = np.linspace(-1, 1, features, dtype=np.float32).reshape(1, features)
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, features])
    return request


_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every living descendant, from /proc.

    Every thread's time is in its process's ``stat``; worker processes are summed too, so
    a server of N processes is measured whole.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += int(stats[p][11]) + int(stats[p][12])  # utime, stime (fields 14, 15)
        todo.extend(children.get(p, ()))
    return total / _TICKS


def context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` (each is a thread that blocked:
    a hand-off between threads costs one or two)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


async def _drive(args: argparse.Namespace) -> dict:
    if args.ca:
        creds = grpc.ssl_channel_credentials(Path(args.ca).read_bytes(),
                                             Path(args.key).read_bytes(),
                                             Path(args.cert).read_bytes())
        channel = grpc.aio.secure_channel(args.target, creds)
    else:
        channel = grpc.aio.insecure_channel(args.target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = _request(args.model, args.features)
    for _ in range(200):  # warm-up: connection, TLS session, server caches
        await stub.ModelInfer(request)
    latencies: list[int] = []
    errors = 0
    deadline = time.perf_counter() + args.seconds

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter_ns()
            try:
                await stub.ModelInfer(request)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter_ns() - t0)

    cpu0 = process_tree_cpu(args.server_pid) if args.server_pid else 0.0
    switches0 = context_switches(args.server_pid) if args.server_pid else 0
    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    cpu = process_tree_cpu(args.server_pid) - cpu0 if args.server_pid else 0.0
    switches = context_switches(args.server_pid) - switches0 if args.server_pid else 0
    await channel.close()
    lat = np.array(latencies) / 1000
    return {"calls": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "throughput": len(latencies) / elapsed,
            "p50_us": float(np.percentile(lat, 50)) if len(lat) else 0.0,
            "p99_us": float(np.percentile(lat, 99)) if len(lat) else 0.0,
            "server_cpu_us": 1e6 * cpu / max(1, len(latencies) + errors),
            "server_switches": switches / max(1, len(latencies) + errors),
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--model", default="demo-mlp")
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--server-pid", type=int, default=0)
    print(json.dumps(asyncio.run(_drive(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
