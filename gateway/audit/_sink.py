"""What the serving layer needs of an audit log, whichever backend keeps it.

One process writes its own file log (:class:`~gateway.audit.AuditLog`); worker processes on one
host hand records to the log their hub process owns (``RemoteAuditLog``); replicas write to
PostgreSQL. The guard and the servicers are typed against this protocol only, so each backend
keeps every promise the file log makes: ``append`` returns once the record is durable, or raises
:class:`~gateway.errors.AuditUnavailable` (the call then fails closed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.audit._log import Receipt


class AuditSink(Protocol):
    """An audit log as the serving layer uses it (records in, receipts and proofs out)."""

    def append(self, kind: str, fields: Mapping[str, object]) -> Receipt:
        """Record ``fields`` as a ``kind`` record; return once durable (AuditUnavailable if not)."""
        ...

    def announce(self) -> None:
        """A call that will append soon is under way (lets group commit wait for it)."""
        ...

    def payload_digest(self, *chunks: bytes) -> str:
        """The keyed digest of a request's payload bytes, as records carry it."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether records can be made durable now (health turns NOT_SERVING when not)."""
        ...

    @property
    def size(self) -> int:
        """Records durable in the log."""
        ...

    @property
    def checkpoint_age(self) -> float:
        """Seconds since the last signed checkpoint was published."""
        ...

    def observe_commits(self, callback: Callable[[float, int], None]) -> None:
        """Call ``callback(seconds, records)`` after each commit (metrics)."""
        ...

    def checkpoint(self) -> str | None:
        """The latest signed checkpoint note."""
        ...

    def fresh_checkpoint(self) -> str | None:
        """A signed checkpoint covering every record durable now."""
        ...

    def entries(self, start: int, end: int) -> list[bytes]:
        """Records ``[start, end)`` as stored (canonical JSON bytes)."""
        ...

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 6962 inclusion proof of record ``index`` in the tree of ``size``."""
        ...

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 6962 consistency proof between two tree sizes."""
        ...

    def root(self, size: int) -> bytes:
        """The Merkle tree head of the first ``size`` records."""
        ...

    def checkpoint_note(self, size: int) -> str | None:
        """The signed checkpoint published at exactly ``size``, if any."""
        ...

    def close(self) -> None:
        """Make everything durable, sign a final checkpoint, release the log."""
        ...
