"""Waiting on a condition with a deadline (never a fixed sleep as synchronisation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Bound on every wait (generous: the machine may be shared with other test runs).
WAIT = 30.0


def wait_for(what: str, probe: Callable[[], T], timeout: float = WAIT) -> T:
    """Poll ``probe`` until it returns something true; return it (AssertionError at timeout,
    naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
