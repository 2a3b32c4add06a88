"""Where one call's time goes, without gRPC: the ModelInfer handlers called directly.

    python -m bench.handler_cost CONFIG      # prints one JSON line of µs figures

`make bench` runs this in its own process on a fresh demo deployment. It starts the gateway
from CONFIG in this process and calls its real ModelInfer servicer, one call at a time:
identity from the demo scorer's certificate, policy, quotas, anomaly scoring, metrics and the
durable audit record. Beside it runs the plain server's handler on the same request. Only the
transport is left out; the context handed to the handlers gives what gRPC would (the peer
certificate, trailing metadata). A third pass makes the audit store's write a no-op, so
records are still built, chained and hashed but not written: full minus that pass is the
durable write's share, and that pass minus plain is the gateway's own Python work.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import grpc

from bench.load import _request
from bench.plain_server import PlainServicer, _load
from gateway.config import load_config
from gateway.server import Gateway
from gateway.server._oip import InferenceServicer

CALLS = 3000
WARMUP = 300


class _Context:
    """What the handlers read from a gRPC call: the verified peer certificate."""

    def __init__(self, pem: bytes) -> None:
        self._auth = {"x509_pem_cert": [pem]}

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"the benchmark call failed: {code.name}: {details}")


def _time(handler, request, context) -> dict[str, float]:
    for _ in range(WARMUP):
        handler(request, context)
    samples = []
    for _ in range(CALLS):
        t0 = time.perf_counter_ns()
        handler(request, context)
        samples.append(time.perf_counter_ns() - t0)
    return {"p50_us": statistics.median(samples) / 1000,
            "mean_us": statistics.fmean(samples) / 1000}


def main(config_path: str) -> None:
    config = load_config(Path(config_path))
    gateway = Gateway.start(config)
    pem = (config.tls.ca.parent / "clients" / "scorer.pem").read_bytes()
    context = _Context(pem)
    request = _request()  # the very request the load generator sends

    plain = PlainServicer(_load(str(config.models.repository)))
    servicer = InferenceServicer(gateway.guard,
                                 max_tensor_elements=config.server.max_tensor_elements)
    result = {"plain": _time(plain.ModelInfer, request, context),
              "gateway": _time(servicer.ModelInfer, request, context)}
    gateway.audit._store.append = lambda *args: None
    result["gateway_no_write"] = _time(servicer.ModelInfer, request, context)
    print(json.dumps(result), flush=True)
    # The last pass chained records that were never written: this throw-away log must not
    # be closed (closing signs a checkpoint over them), so leave without shutting down.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
