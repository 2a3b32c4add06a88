"""`gateway model ...` verbs: one module per verb family, all under the `model` group.

    gateway model sign|verify           (_model_signing)
    gateway model encrypt|decrypt|rewrap (_model_encryption)
    gateway model scan|test             (_model_scan)
    gateway model profile               (_model_profile)
    gateway model keygen|load|unload|list (_model_admin)
"""

from __future__ import annotations

import argparse
import importlib

_FAMILIES = ("_model_signing", "_model_encryption", "_model_scan", "_model_profile",
             "_model_admin")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `model` verb group and every family's verbs under it."""
    parser = subparsers.add_parser("model",
                                   help="sign, verify, encrypt, scan, test, profile models")
    verbs = parser.add_subparsers(dest="model_command", metavar="VERB", required=True)
    for name in _FAMILIES:
        importlib.import_module(f"gateway.cli.{name}").register(verbs)
