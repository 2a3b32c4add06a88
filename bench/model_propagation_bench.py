"""Model desired state across replicas: from LoadModel on one replica until ModelReady on the other.

    python -m bench model_propagation     (or `make bench`, which calls run())

Two gateway processes with ``[state] backend = "postgresql"`` on one schema; each round calls
UnloadModel, then LoadModel, for demo-types version 1 on replica A and polls ModelReady on
replica B every 5 ms until it answers accordingly (the reply itself waits for B's answer, so
B is normally ready when it arrives). Beside it, the baseline measured in the same run: the
same calls on a lone gateway (``[state] backend = "local"``, the change applied in the
calling thread), timed until its own ModelReady answers. Printed: median and worst of the
rounds for load and unload, and the replicas' median as a ratio of the lone gateway's.

The server is $GATEWAY_TEST_DSN, else the tests' default (127.0.0.1:5432, user postgres,
database test); without one the benchmark says so and skips.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._pg import scratch_schema

ROUNDS = 20
MODEL, VERSION = "demo-types", "1"


def run() -> None:
    """Print the figures (called by `make bench`)."""
    with scratch_schema("model propagation") as dsn:
        if dsn is None:
            return
        with tempfile.TemporaryDirectory(prefix="model-propagation-") as tmp:
            _measure(Path(tmp), dsn)


def _measure(root: Path, dsn: str) -> None:
    import grpc
    import tritonclient.grpc as tc

    from gateway._proto.gateway.v1 import admin_pb2 as pb
    from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
    from gateway.devenv import make_demo_env, make_replicas, start_gateway

    models = {"reverify_interval": 0.0}
    envs = make_replicas(root / "gw", state={"backend": "postgresql", "dsn": dsn},
                         models=models)
    alone = make_demo_env(root / "alone", models=models)
    gateways = [start_gateway(e) for e in (*envs, alone)]
    env = envs[0]
    cert, key = env.client_files("admin")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(env.certs / "ca.pem").read_bytes(),
        private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
    alone_credentials = grpc.ssl_channel_credentials(
        root_certificates=(alone.certs / "ca.pem").read_bytes(),
        private_key=alone.client_files("admin")[1].read_bytes(),
        certificate_chain=alone.client_files("admin")[0].read_bytes())
    channels = [grpc.secure_channel(gateways[0].target, credentials),
                grpc.secure_channel(gateways[2].target, alone_credentials)]

    def ready_probe(gw, environment) -> Callable[[], bool]:
        scorer_cert, scorer_key = environment.client_files("scorer")
        client = tc.InferenceServerClient(
            url=gw.target, ssl=True, root_certificates=str(environment.certs / "ca.pem"),
            private_key=str(scorer_key), certificate_chain=str(scorer_cert))
        return lambda: bool(client.is_model_ready(MODEL, VERSION))

    replicas = (pb_grpc.ModelAdminStub(channels[0]), ready_probe(gateways[1], envs[1]))
    lone = (pb_grpc.ModelAdminStub(channels[1]), ready_probe(gateways[2], alone))
    figures: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(ROUNDS):
            for label, (stub, ready) in (("replicas", replicas), ("alone", lone)):
                for op, call, request, want in (
                        ("unload", stub.UnloadModel,
                         pb.UnloadModelRequest(name=MODEL, version=VERSION), False),
                        ("load", stub.LoadModel,
                         pb.LoadModelRequest(name=MODEL, version=VERSION), True)):
                    started = time.perf_counter()
                    call(request, timeout=60)
                    deadline = started + 30
                    while ready() != want:
                        if time.perf_counter() > deadline:
                            raise RuntimeError(f"{label}: ModelReady did not follow {op}")
                        time.sleep(0.005)
                    figures.setdefault((label, op), []).append(time.perf_counter() - started)
    finally:
        for c in channels:
            c.close()
        for gw in gateways:
            gw.stop()
    for op in ("load", "unload"):
        on_b, alone_s = figures[("replicas", op)], figures[("alone", op)]
        ratio = statistics.median(on_b) / statistics.median(alone_s)
        print(f"{op.capitalize()}Model on replica A until ModelReady on replica B: median "
              f"{statistics.median(on_b) * 1000:.0f} ms, worst {max(on_b) * 1000:.0f} ms over "
              f"{ROUNDS} calls; a lone gateway (local state): median "
              f"{statistics.median(alone_s) * 1000:.0f} ms, worst {max(alone_s) * 1000:.0f} "
              f"ms ({ratio:.2f}x)")


if __name__ == "__main__":
    run()
