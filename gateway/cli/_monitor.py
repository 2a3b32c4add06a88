"""`gateway monitor ...` verbs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `monitor` verb group."""
    parser = subparsers.add_parser("monitor", help="monitor tools (not yet implemented)")
    parser.set_defaults(func=lambda args: parser.error("not implemented yet"))
