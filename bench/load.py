"""Load generator for `make bench`, run as its own process so it does not share the GIL.

    python -m bench.load TARGET --concurrency 16 --seconds 3 [--ca CA --cert C --key K]

Drives ModelInfer on demo-mlp with a grpc.aio client (N concurrent callers on one event
loop) and prints one JSON line: calls, errors, seconds, throughput, p50 and p99 in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def _drive(args: argparse.Namespace) -> dict:
    if args.ca:
        creds = grpc.ssl_channel_credentials(Path(args.ca).read_bytes(),
                                             Path(args.key).read_bytes(),
                                             Path(args.cert).read_bytes())
        channel = grpc.aio.secure_channel(args.target, creds)
    else:
        channel = grpc.aio.insecure_channel(args.target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = _request()
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

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    await channel.close()
    lat = np.array(latencies) / 1000
    return {"calls": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
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
    print(json.dumps(asyncio.run(_drive(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
