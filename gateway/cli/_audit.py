"""`gateway audit ...` verbs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `audit` verb group."""
    parser = subparsers.add_parser("audit", help="audit tools (not yet implemented)")
    parser.set_defaults(func=lambda args: parser.error("not implemented yet"))
