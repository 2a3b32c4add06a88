"""Cost of caller authentication, measured on real gRPC contexts over mutual TLS.

    .venv/bin/python -m gateway.identity._bench       (or bench/identity_bench.py: run())

Prints microseconds per call, side by side in one run, for: reading the auth context
(the floor every approach pays), ``authenticate`` with a warm cache (the hot path), and
``authenticate`` parsing the certificate every time (what the cache saves); then the
latency of a unary RPC without and with ``authenticate`` (median of interleaved
rounds), as a ratio.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

from gateway.identity import IdentityVerifier, pki, server_credentials
from gateway.identity._x509 import identity_from_pem

_LOOPS = 20_000
_RPCS = 1_000
_ROUNDS = 7


def _per_call_us(fn, loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - start) / loops * 1e6


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pki.init_dev_pki(d)
        verifier = IdentityVerifier(["demo.local"])
        domains, issuers = verifier.trust_domains, verifier.cn_issuers
        figures: dict[str, float] = {}

        def measure(request: bytes, context: grpc.ServicerContext) -> bytes:
            pem = context.auth_context()["x509_pem_cert"][0]
            figures["auth_context()"] = _per_call_us(context.auth_context, _LOOPS)
            figures["authenticate, cached"] = _per_call_us(
                lambda: verifier.authenticate(context), _LOOPS)
            figures["authenticate, uncached"] = _per_call_us(
                lambda: (context.auth_context(), identity_from_pem(pem, domains, issuers)),
                _LOOPS // 10)
            return b""

        def plain(request: bytes, context: grpc.ServicerContext) -> bytes:
            return b""

        def authed(request: bytes, context: grpc.ServicerContext) -> bytes:
            return verifier.authenticate(context).id.encode()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Id", {
            "Measure": grpc.unary_unary_rpc_method_handler(measure),
            "Plain": grpc.unary_unary_rpc_method_handler(plain),
            "Authed": grpc.unary_unary_rpc_method_handler(authed),
        }),))
        port = server.add_secure_port(
            "127.0.0.1:0", server_credentials(d / "server.pem", d / "server.key", d / "ca.pem"))
        server.start()
        try:
            creds = grpc.ssl_channel_credentials(
                (d / "ca.pem").read_bytes(), (d / "clients/scorer.key").read_bytes(),
                (d / "clients/scorer.pem").read_bytes())
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                channel.unary_unary("/bench.Id/Measure")(b"", timeout=120)
                samples: dict[str, list[float]] = {"Plain": [], "Authed": []}
                for _ in range(_ROUNDS):  # interleaved rounds; the median damps noise
                    for name, runs in samples.items():
                        stub = channel.unary_unary(f"/bench.Id/{name}")
                        runs.append(_per_call_us(lambda s=stub: s(b"", timeout=10), _RPCS))
                rpc = {name: statistics.median(runs) for name, runs in samples.items()}
        finally:
            server.stop(None).wait()

    base = figures["auth_context()"]
    print("identity: caller authentication cost (µs/call, ratio to reading auth_context)")
    for name, us in figures.items():
        print(f"  {name:<24} {us:8.2f} µs   {us / base:6.2f}x")
    print(f"  unary RPC over mTLS      plain {rpc['Plain']:.0f} µs, with authenticate "
          f"{rpc['Authed']:.0f} µs: {rpc['Authed'] / rpc['Plain']:.3f}x")


if __name__ == "__main__":
    run()
