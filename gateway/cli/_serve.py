"""`gateway serve`: run the gateway in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import sys


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
    from gateway.server import Gateway, client_hint

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    gateway = Gateway.start(config)
    gateway.install_signal_handlers()
    host = config.server.listen.rsplit(":", 1)[0]
    print(f"gateway listening on {host}:{gateway.port} (mutual TLS; clients need a "
          f"certificate from {config.tls.ca})", flush=True)
    if gateway.metrics_address:
        print(f"metrics on {gateway.metrics_url}", flush=True)
    print("try:  " + client_hint(config, gateway.port), flush=True)
    gateway.wait()
    return 0
