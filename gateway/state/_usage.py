"""Usage rows handed from workers to the hub, where one monitor scores every worker's traffic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Usage:
    """One request's rows for background scoring, as a worker's monitor queues them."""

    model: str
    caller: str
    x: np.ndarray
    y: np.ndarray | None
    #: The model's profile (its profile.json bytes, as the worker verified them) and their
    #: SHA-256, so the hub parses each profile once; both empty when the model has none.
    profile: bytes = b""
    profile_digest: str = ""


#: The hub's side: called with the sending member's id and a batch of its usage.
UsageHandler = Callable[[str, list[Usage]], None]


class UsageSink(Protocol):
    """Where a worker's monitor hands its background scoring (instead of its own thread)."""

    def submit(self, usage: Usage) -> bool:
        """Queue one request's usage; False when it cannot be (queue full, hub gone)."""
        ...

    def flush(self) -> None:
        """Send what is queued now (also at shutdown)."""
        ...

    def on_dropped(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(n)`` whenever ``n`` requests are dropped unscored (queue full, or
        the hub unreachable when their batch was sent), for the monitor's metric."""
        ...
