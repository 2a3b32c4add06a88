"""Load generator for `make bench`, run as its own process so it does not share the GIL.

    python -m bench.load TARGET --concurrency 16 --seconds 3 [--ca CA --cert C --key K]
                            [--channels 4] [--server-pid PID]

Drives ModelInfer on demo-mlp with a grpc.aio client (N concurrent callers on one event
loop) and prints one JSON line: calls, errors, seconds, throughput, p50 and p99 in µs.
``--channels`` spreads the callers over that many connections (worker processes sharing a
port with SO_REUSEPORT each get whole connections). ``--server-pid`` adds ``server_cpu_s``:
user + system CPU seconds of that process and all its descendants during the timed part.
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


def _request() -> pb.ModelInferRequest:
    x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    return request


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


async def _drive(args: argparse.Namespace) -> dict:
    channels = []
    for _ in range(args.channels):
        # Distinct channel arguments: one connection each, not one shared subchannel.
        options = [("grpc.channel_id", len(channels))]
        if args.ca:
            creds = grpc.ssl_channel_credentials(Path(args.ca).read_bytes(),
                                                 Path(args.key).read_bytes(),
                                                 Path(args.cert).read_bytes())
            channels.append(grpc.aio.secure_channel(args.target, creds, options=options))
        else:
            channels.append(grpc.aio.insecure_channel(args.target, options=options))
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
    request = _request()
    for i in range(200):  # warm-up: connections, TLS sessions, server caches
        await stubs[i % len(stubs)].ModelInfer(request)
    latencies: list[int] = []
    errors = 0
    cpu_before = tree_cpu_seconds(args.server_pid) if args.server_pid else 0.0
    deadline = time.perf_counter() + args.seconds
    callers = iter(range(args.concurrency))

    async def caller() -> None:
        nonlocal errors
        stub = stubs[next(callers) % len(stubs)]
        while time.perf_counter() < deadline:
            t0 = time.perf_counter_ns()
            try:
                await stub.ModelInfer(request)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter_ns() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    cpu = tree_cpu_seconds(args.server_pid) - cpu_before if args.server_pid else 0.0
    for channel in channels:
        await channel.close()
    lat = np.array(latencies) / 1000
    return {"server_cpu_s": cpu, "calls": len(latencies), "errors": errors,
            "seconds": round(elapsed, 3),
            "throughput": len(latencies) / elapsed,
            "p50_us": float(np.percentile(lat, 50)) if len(lat) else 0.0,
            "p99_us": float(np.percentile(lat, 99)) if len(lat) else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--server-pid", type=int, default=0)
    print(json.dumps(asyncio.run(_drive(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
