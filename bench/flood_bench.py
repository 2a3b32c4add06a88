"""One identity flooding, another served (issue 16): the scorer's ModelInfer p50 alone and
under a flood from the admin, side by side in one run, with the server's CPU time.

The flood is the one of ``tests/e2e/test_gateway_surface.py`` (200 reflection streams held
open, 16 threads of denied ModelInfer calls on one channel), but from its own process, so
the victim's client does not share an interpreter with the flooder's 16 threads. Each
round measures, on one fresh gateway:

  (a) the scorer alone: 200 sequential calls, p50, server CPU per call;
  (b) the flood alone for 2 s: answers per second, server CPU per answer (what one refused
      call costs: a lone flooder is not paused, nobody else is waiting);
  (c) the scorer's 200 calls under the flood: p50 over the p50 of (a) and of 200 more
      calls once the flood has ended, and the flood's answers meanwhile.

Server CPU is user + system time of the gateway process (all its threads) from /proc.

    python -m bench flood
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROUNDS = 3
CALLS = 200
FLOOD_THREADS = 16
FLOOD_STREAMS = 200


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _request():  # type: ignore[no-untyped-def]
    import numpy as np

    from gateway._proto.inference import grpc_service_pb2 as pb

    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    return request


def _channel(target: str, certs: Path, name: str):  # type: ignore[no-untyped-def]
    import grpc

    return grpc.secure_channel(target, grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / "clients" / f"{name}.key").read_bytes(),
        (certs / "clients" / f"{name}.pem").read_bytes()))


def _latencies(stub, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    request, out = _request(), []
    for _ in range(count):
        t0 = time.perf_counter()
        stub.ModelInfer(request, timeout=30)
        out.append(time.perf_counter() - t0)
    return out


def flood(target: str, certs: Path) -> None:
    """The flooder process: prints ``ready``, then the answers so far for each line read."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc

    channel = _channel(target, certs, "admin")
    release, stop = threading.Event(), threading.Event()

    def held():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(600)

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    streams = [reflect.ServerReflectionInfo(held(), timeout=600)
               for _ in range(FLOOD_STREAMS)]
    for stream in streams:
        try:
            next(stream)
        except grpc.RpcError:
            pass  # over the stream limits: RESOURCE_EXHAUSTED, as expected
    answers = [0] * FLOOD_THREADS

    def denied(i: int) -> None:
        stub, request = pb_grpc.GRPCInferenceServiceStub(channel), _request()
        while not stop.is_set():
            try:
                stub.ModelInfer(request, timeout=30)
            except grpc.RpcError:
                pass
            answers[i] += 1

    threads = [threading.Thread(target=denied, args=(i,)) for i in range(FLOOD_THREADS)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for _ in sys.stdin:
        print(sum(answers), flush=True)
    stop.set()
    release.set()
    for stream in streams:
        stream.cancel()
    for t in threads:
        t.join(30)
    os._exit(0)  # without waiting for grpc's own threads to wind down


def _round(tmp: Path) -> dict[str, float]:
    from gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
    from gateway.devenv import make_demo_env, start_gateway

    env = make_demo_env(tmp)
    gw = start_gateway(env)
    pid = gw.proc.pid
    try:
        with _channel(gw.target, env.certs, "scorer") as victim:
            stub = pb_grpc.GRPCInferenceServiceStub(victim)
            _latencies(stub, 50)
            c0, t0 = _cpu_seconds(pid), time.perf_counter()
            quiet = _latencies(stub, CALLS)
            quiet_cpu = (_cpu_seconds(pid) - c0) / CALLS
            flooder = subprocess.Popen(
                [sys.executable, "-m", "bench.flood_bench", "flood", gw.target,
                 str(env.certs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert flooder.stdin is not None and flooder.stdout is not None
            try:
                assert flooder.stdout.readline().strip() == "ready"

                def answered() -> int:
                    assert flooder.stdin is not None and flooder.stdout is not None
                    flooder.stdin.write("\n")
                    flooder.stdin.flush()
                    return int(flooder.stdout.readline())

                n0, c0, t0 = answered(), _cpu_seconds(pid), time.perf_counter()
                time.sleep(2.0)  # the measurement window of the flood alone
                n1, c1, t1 = answered(), _cpu_seconds(pid), time.perf_counter()
                loaded = _latencies(stub, CALLS)
                n2, c2, t2 = answered(), _cpu_seconds(pid), time.perf_counter()
            finally:
                flooder.stdin.close()
                try:
                    flooder.wait(60)
                except subprocess.TimeoutExpired:
                    flooder.kill()
                    flooder.wait()
            quiet += _latencies(stub, CALLS)  # alone again: the baseline brackets the flood
    finally:
        gw.stop()
    return {
        "quiet_p50_ms": statistics.median(quiet) * 1e3,
        "quiet_cpu_us": quiet_cpu * 1e6,
        "flood_alone_per_s": (n1 - n0) / (t1 - t0),
        "refusal_cpu_us": (c1 - c0) / max(1, n1 - n0) * 1e6,
        "loaded_p50_ms": statistics.median(loaded) * 1e3,
        "flood_under_per_s": (n2 - n1) / (t2 - t1),
        "server_cores_under": (c2 - c1) / (t2 - t1),
    }


def run() -> None:
    """Print the figures (called by `make bench`)."""
    ratios = []
    with tempfile.TemporaryDirectory(prefix="flood-bench-") as tmp:
        for i in range(ROUNDS):
            r = _round(Path(tmp) / f"r{i}")
            ratio = r["loaded_p50_ms"] / r["quiet_p50_ms"]
            ratios.append(ratio)
            print(f"round {i}: scorer p50 alone {r['quiet_p50_ms']:.2f} ms "
                  f"({r['quiet_cpu_us']:.0f} µs server CPU a call); flood alone "
                  f"{r['flood_alone_per_s']:.0f} answers/s at {r['refusal_cpu_us']:.0f} µs "
                  f"server CPU each; scorer p50 under the flood {r['loaded_p50_ms']:.2f} ms "
                  f"= {ratio:.2f}x, flood meanwhile {r['flood_under_per_s']:.0f} answers/s, "
                  f"server {r['server_cores_under']:.2f} cores; load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    print(f"scorer p50 under the flood / alone: median {statistics.median(ratios):.2f}x "
          f"of {ROUNDS} rounds (target <= 2x)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        flood(sys.argv[2], Path(sys.argv[3]))
    else:
        run()
