"""`gateway model` verbs for profile (not yet implemented)."""

from __future__ import annotations

import argparse


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this family's verbs to the `model` group."""
