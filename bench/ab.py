"""Before/after: the gateway of another commit against this checkout's, at once, side by side.

    python -m bench.ab REV [ROUNDS [CONCURRENCY]]   # e.g. python -m bench.ab c545e81 8

Across two runs of ``python -m bench cpu`` the figures of one and the same server move by more
than most changes (the machine is shared), so a change is measured here with both gateways
running at the same time: REV's package (``git archive REV gateway``, put first on
``PYTHONPATH`` of its process) and this checkout's, each from its own demo deployment, driven
in alternating rounds of ``bench/load.py`` at concurrency 16 (or CONCURRENCY) on demo-mlp.
Prints the medians: calls/s, server CPU per call (user + system of the process tree, from
/proc), p50, context switches per call, load average.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.cpu_bench import Server, alternate
from gateway.devenv import GatewayProcess, make_demo_env, start_gateway

_REPO = Path(__file__).resolve().parent.parent


def _export(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", rev, "gateway"], cwd=_REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def main() -> None:
    rev = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    with tempfile.TemporaryDirectory(prefix="gateway-ab-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _export(rev, base)
        servers: list[Server] = []
        procs: list[GatewayProcess] = []
        saved = os.environ.get("PYTHONPATH")
        try:
            for name, path in ((rev, str(base)), ("this", None)):
                env = make_demo_env(Path(tmp) / f"env-{len(procs)}")
                if path is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = path
                try:
                    procs.append(start_gateway(env))
                finally:
                    if saved is None:
                        os.environ.pop("PYTHONPATH", None)
                    else:
                        os.environ["PYTHONPATH"] = saved
                cert, key = env.client_files("scorer")
                servers.append(Server(name, procs[-1].target, procs[-1].proc.pid,
                                      ["--ca", str(env.certs / "ca.pem"), "--cert", str(cert),
                                       "--key", str(key)]))
            rows = alternate(servers, concurrency, rounds=rounds)
        finally:
            for proc in procs:
                proc.stop()
    print(f"demo-mlp, concurrency {concurrency}, medians of {rounds} alternating rounds:")
    for server, row in zip(servers, rows, strict=True):
        print(f"  {server.name:12s} {row['throughput']:7.0f} calls/s  "
              f"{row['server_cpu_us']:6.0f} µs CPU a call  p50 {row['p50_us']:6.0f} µs  "
              f"{row['server_switches']:5.1f} switches a call  load {row['load']:.1f}")
    before, after = rows[0]["server_cpu_us"], rows[1]["server_cpu_us"]
    print(f"  CPU a call, this / {rev}: {after / before:.3f}")


if __name__ == "__main__":
    main()
