"""Handler threads (and the GIL switch interval) of the gateway, side by side with the plain
server at as many threads: the scan behind ``[server] threads``' default.

    python -m bench.threads_scan [--threads 16,8,6,4] [--switch 0.001,0.02] [--rounds 5]

Every server is started once, then driven by ``bench/load.py`` in alternating rounds
(:func:`bench.cpu_bench.alternate`) at concurrency 16 and 1; each gateway is one process
with the former limits scaled to 16 threads where it has that many (8 calls per identity,
4 streams), so only the thread count differs. ``--switch`` adds gateways at the first and
the last thread count with ``sys.setswitchinterval`` set to each value at start-up (through
a ``sitecustomize`` module in the gateway process only). Not part of ``make bench``
(about 5 minutes); figures in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.cpu_bench import Server, _address, _spawn_plain, _table, alternate
from gateway.devenv import GatewayProcess, make_demo_env, start_gateway

_SITECUSTOMIZE = """import os, sys
if os.environ.get("BENCH_SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
"""


def _gateway(root: Path, threads: int, switch: str | None, site: Path) -> GatewayProcess:
    limits = ({"max_calls_per_identity": 8, "max_streams": 4} if threads >= 16 else {})
    env = make_demo_env(root, server={"threads": threads, **limits})
    saved = {k: os.environ.get(k) for k in ("BENCH_SWITCH_INTERVAL", "PYTHONPATH")}
    if switch:
        os.environ["BENCH_SWITCH_INTERVAL"] = switch
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site),
                                                                saved["PYTHONPATH"]]))
    try:
        return start_gateway(env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="16,8,6,4")
    parser.add_argument("--switch", default="", help="switch intervals in seconds, e.g. 0.001")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    shapes: list[tuple[int, str | None]] = [(n, None) for n in counts]
    for switch in filter(None, args.switch.split(",")):
        shapes += [(counts[0], switch), (counts[-1], switch)]
    with tempfile.TemporaryDirectory(prefix="threads-scan-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        gateways: list[GatewayProcess] = []
        plains = []
        servers = []
        try:
            for i, (threads, switch) in enumerate(shapes):
                gw = _gateway(Path(tmp) / f"gw{i}", threads, switch, site)
                gateways.append(gw)
                cert, key = gw.env.client_files("scorer")
                tls = ["--ca", str(gw.env.certs / "ca.pem"), "--cert", str(cert),
                       "--key", str(key)]
                name = f"gw t{threads}" + (f" s{switch}" if switch else "")
                servers.append(Server(name, gw.target, gw.proc.pid, tls))
            for threads in counts:
                proc = _spawn_plain(str(gateways[0].env.models), "--workers", str(threads))
                plains.append(proc)
                servers.append(Server(f"plain t{threads}", _address(proc), proc.pid, []))
            for concurrency in (16, 1):
                rows = alternate(servers, concurrency, args.rounds)
                _table(f"demo-mlp, concurrency {concurrency}, medians of {args.rounds} "
                       "alternating rounds", servers, rows)
        finally:
            for proc in plains:
                proc.terminate()
                proc.wait()
            for gw in gateways:
                gw.stop()


if __name__ == "__main__":
    main()
