"""`gateway serve`: run the gateway in the foreground until SIGTERM or Ctrl-C.

With ``[server] processes`` above 1 this process becomes the supervisor of a hub and that many
worker processes sharing the port (``gateway.server.Supervisor``); the lines printed once
ready are the same either way.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` verb."""
    parser = subparsers.add_parser(
        "serve", help="run the gateway (mTLS gRPC) in the foreground",
        description="Run the gateway. With no --config, the demo defaults apply: "
                    "certs/dev, models/, policies/, var/audit under the working directory.")
    parser.add_argument("--config", metavar="FILE", help="gateway TOML configuration file")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.server import Gateway, Supervisor, supervise

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `kill -USR1 PID` writes every thread's stack to stderr: what a stuck gateway is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    config = load_config(args.config)
    if config.server.processes > 1:
        def ready(supervisor: Supervisor) -> None:
            _print_ready(config, supervisor.port, supervisor.metrics_url,
                         f"{config.server.processes} worker processes")

        return supervise(config, ready)
    gateway = Gateway.start(config)
    gateway.install_signal_handlers()
    _print_ready(config, gateway.port, gateway.metrics_url if gateway.metrics_address else "",
                 "one process")
    gateway.wait()
    return 0


def _print_ready(config: GatewayConfig, port: int, metrics_url: str, processes: str) -> None:
    from gateway.server import client_hint

    host = config.server.listen.rsplit(":", 1)[0]
    print(f"gateway listening on {host}:{port} (mutual TLS; clients need a "
          f"certificate from {config.tls.ca}; {processes})", flush=True)
    if metrics_url:
        print(f"metrics on {metrics_url}", flush=True)
    print("try:  " + client_hint(config, port), flush=True)
