"""`gateway policy ...` verbs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `policy` verb group."""
    parser = subparsers.add_parser("policy", help="policy tools (not yet implemented)")
    parser.set_defaults(func=lambda args: parser.error("not implemented yet"))
