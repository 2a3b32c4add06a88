"""Before/after for the durable audit record: the floor of another commit against this one's.

    python -m bench.floor_ab REV [ROUNDS] [--c1]

The floor is ``bench/plain_server.py --audit`` (the plain server with mutual TLS and one
durable record per call through the gateway's own AuditLog). The CPU a record costs is the
floor's CPU per call minus the mtls server's, and on this shared machine that difference is
smaller than the drift between two runs, so this starts, at once, the mtls server, REV's
floor (``git archive REV gateway bench`` first on its ``PYTHONPATH``) and this checkout's,
each floor on its own log, and drives them in alternating rounds of ``bench/load.py`` at
concurrency 16 on demo-mlp (and at concurrency 1 with ``--c1``, for p50). Prints the
medians: calls/s, CPU per call (user + system of the process, from /proc), the record's
share (floor minus mtls), p50, voluntary context switches per call, load average.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.cpu_bench import Server, alternate
from gateway.devenv import make_demo_env

_REPO = Path(__file__).resolve().parent.parent


def _spawn(path: Path, cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.Popen([sys.executable, "-m", "bench.plain_server", *args],
                            stdout=subprocess.PIPE, text=True, cwd=cwd, env=env)


def _table(title: str, servers: list[Server], rows: list[dict]) -> None:
    print(title)
    mtls = rows[0]["server_cpu_us"]
    for server, row in zip(servers, rows, strict=True):
        cpu = row["server_cpu_us"]
        print(f"  {server.name:12s} {row['throughput']:7.0f} calls/s  "
              f"{cpu:6.0f} µs CPU a call (record {cpu - mtls:5.0f})"
              f"  p50 {row['p50_us']:6.0f} µs  {row['server_switches']:5.1f} switches a call  "
              f"load {row['load']:.1f}", flush=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rev = args[0]
    rounds = int(args[1]) if len(args) > 1 else 6
    with tempfile.TemporaryDirectory(prefix="gateway-floor-ab-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", rev, "gateway", "bench"], cwd=_REPO,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        env = make_demo_env(Path(tmp) / "mtls")
        cert, key = env.client_files("scorer")
        tls = ["--ca", str(env.certs / "ca.pem"), "--cert", str(cert), "--key", str(key)]
        models, certs = str(env.models), str(env.certs)
        procs = [_spawn(_REPO, env.root, models, certs)]
        for name, path in ((rev, base), ("this", _REPO)):
            floor_env = make_demo_env(Path(tmp) / f"floor-{name}")
            procs.append(_spawn(path, floor_env.root, models, certs, "--audit",
                                str(floor_env.config)))
        try:
            servers = []
            for name, proc in zip(("mtls", f"floor {rev}", "floor this"), procs, strict=True):
                assert proc.stdout is not None
                servers.append(Server(name, proc.stdout.readline().split()[-1], proc.pid, tls))
            rows = alternate(servers, 16, rounds=rounds)
            _table(f"demo-mlp, concurrency 16, medians of {rounds} alternating rounds:",
                   servers, rows)
            if "--c1" in sys.argv:
                rows = alternate(servers, 1, rounds=rounds)
                _table("concurrency 1:", servers, rows)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
