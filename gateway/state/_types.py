"""The shapes of state shared by every process of a host, or every replica of a deployment."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

#: A topic's handler: applies ``payload`` for ``key`` in this member; None when applied, else
#: the error (reported back to whoever asked for the change).
Handler = Callable[[str, Mapping[str, object]], "str | None"]


class Buckets(Protocol):
    """Token buckets shared by every member that opened the same state.

    ``rate`` tokens a second up to ``burst``; each key's rule travels with the call, so members
    configured alike agree without a registry of rules.
    """

    def take(self, key: str, rate: float, burst: int, n: int = 1) -> bool:
        """Take ``n`` tokens from ``key``'s bucket; False (nothing taken) when it lacks them."""
        ...

    def give_back(self, key: str, rate: float, burst: int, n: int) -> None:
        """Return ``n`` tokens taken but not spent (a call refused after it was charged)."""
        ...

    def available(self, key: str, rate: float, burst: int) -> float:
        """Tokens ``key`` has now as this member knows it, for messages ("retry in ...",
        "N left"); exact for local buckets, as of the last round trip for shared ones."""
        ...


@dataclass(frozen=True)
class Applied:
    """One member's answer to a change applied everywhere."""

    member: str
    ok: bool
    detail: str = ""


class Coordinator(Protocol):
    """Applies a change in every member (worker process or replica) before it returns.

    The change is also kept as the desired state of its key, so a member that starts later
    (a restarted worker, a new replica) applies it when it subscribes.
    """

    member: str

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Apply ``topic``'s current desired state now, and every later change, with ``handler``."""
        ...

    def apply_everywhere(self, topic: str, key: str, payload: Mapping[str, object],
                         timeout: float) -> list[Applied]:
        """Store ``payload`` as ``key``'s desired state; return each live member's answer
        (a member that did not answer within ``timeout`` seconds: ``ok=False``)."""
        ...

    def close(self) -> None:
        ...
