"""The ``gateway`` command: one module per verb group, each beside its tests.

    gateway serve [--config FILE]          run the gateway
    gateway demo init                      demo PKI, signed demo models, audit key
    gateway certs init                     development PKI only
    gateway policy check|test|explain|diff|fmt
    gateway audit keygen|vkey|checkpoint|entry|entries|prove|prove-consistency|verify|
                  verify-proof|verify-consistency|export
    gateway model sign|verify|encrypt|decrypt|rewrap|scan|test|profile
    gateway monitor                        live terminal summary

Each verb module exposes ``register(subparsers)``; its handler returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway.errors import GatewayError

# Verb-group modules, in the order `gateway --help` lists them.
_VERBS = ("_serve", "_demo", "_certs", "_policy", "_audit", "_model", "_monitor")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and shell completion)."""
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Policy-as-code access-control gateway for ML inference.",
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _VERBS:
        importlib.import_module(f"gateway.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except GatewayError as err:
        if args.verbose:
            raise
        print(f"gateway: error: {err.diagnostics()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
