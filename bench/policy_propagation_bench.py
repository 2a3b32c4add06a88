"""Policy propagation: from `gateway policy push` until every replica decides with it.

    python -m bench policy_propagation     (or `make bench`, which calls run())

Two gateway processes read their policy from one PostgreSQL schema (source "postgresql",
polling backstop set to 60 s so the figure is the LISTEN/NOTIFY path). Each round pushes one of
two policies in turn with the real CLI and polls GetPolicy on both replicas every 5 ms until
both name the new digest. Printed: the time from starting the `gateway policy push` process
(its interpreter start, checks and cases included) and from its exit (just after the commit; a
replica may already have installed by then) until the last replica installed, median and
worst of the rounds, beside the 2 s target as a ratio.

The server is $GATEWAY_TEST_DSN, else the tests' default (127.0.0.1:5432, user postgres,
database test); without one the benchmark says so and skips.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._pg import scratch_schema

ROUNDS = 10
TARGET_S = 2.0
EXTRA = ("p, role:auditors, demo-mlp, metadata, allow\n",
         "  - caller: spiffe://demo.local/team/audit/auditor\n    model: demo-mlp\n"
         "    action: metadata\n    expect: allow\n")


def run() -> None:
    """Print the figures (called by `make bench`)."""
    with scratch_schema("policy propagation") as dsn:
        if dsn is None:
            return
        with tempfile.TemporaryDirectory(prefix="policy-propagation-") as tmp:
            _measure(Path(tmp), dsn)


def _policies(root: Path) -> list[Path]:
    from gateway.devenv import REPO

    plain = root / "plain"
    shutil.copytree(REPO / "policies", plain)
    extra = root / "extra"
    shutil.copytree(REPO / "policies", extra)
    with (extra / "policy.csv").open("a") as f:
        f.write(EXTRA[0])
    with (extra / "tests" / "demo.yaml").open("a") as f:
        f.write(EXTRA[1])
    return [plain, extra]


def _push(directory: Path, dsn: str) -> None:
    subprocess.run([sys.executable, "-m", "gateway", "policy", "push", str(directory),
                    "--dsn", dsn], check=True, capture_output=True, timeout=120)


def _measure(root: Path, dsn: str) -> None:
    import grpc

    from gateway._proto.gateway.v1 import admin_pb2 as pb
    from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
    from gateway.devenv import make_replicas, start_gateway

    policies = _policies(root)
    _push(policies[0], dsn)
    envs = make_replicas(root / "gw", policy={"source": "postgresql", "dsn": dsn,
                                              "watch_interval": 60.0},
                         models={"reverify_interval": 0.0})
    env = envs[0]
    gateways = [start_gateway(e) for e in envs]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(env.certs / "ca.pem").read_bytes(),
        private_key=env.client_files("admin")[1].read_bytes(),
        certificate_chain=env.client_files("admin")[0].read_bytes())
    channels = [grpc.secure_channel(gw.target, credentials) for gw in gateways]
    stubs = [pb_grpc.PolicyAdminStub(c) for c in channels]
    from_start, from_commit = [], []
    try:
        for i in range(ROUNDS):
            directory = policies[(i + 1) % 2]
            before = stubs[0].GetPolicy(pb.GetPolicyRequest()).digest
            started = time.perf_counter()
            _push(directory, dsn)
            committed = time.perf_counter()
            pending = set(range(len(stubs)))
            deadline = committed + 30
            while pending:
                for k in list(pending):
                    if stubs[k].GetPolicy(pb.GetPolicyRequest()).digest != before:
                        pending.discard(k)
                if pending and time.perf_counter() > deadline:
                    raise RuntimeError("a replica did not install the pushed policy in 30 s")
                if pending:
                    time.sleep(0.005)
            done = time.perf_counter()
            from_start.append(done - started)
            from_commit.append(done - committed)
    finally:
        for c in channels:
            c.close()
        for gw in gateways:
            gw.stop()
    for label, values in (("from `policy push` start", from_start),
                          ("from its exit (after the commit)", from_commit)):
        median = statistics.median(values)
        print(f"policy propagation to 2 replicas, {label}: median {median * 1000:.0f} ms, "
              f"worst {max(values) * 1000:.0f} ms over {ROUNDS} pushes "
              f"({median / TARGET_S:.3f}x the {TARGET_S:.0f} s target)")


if __name__ == "__main__":
    run()
