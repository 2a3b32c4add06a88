"""The one rule for reading a segment file: which bytes are records, which are a torn write,
and which are damage. The gateway's open path and ``verify`` both call :func:`parse_segment`,
so they agree on what a damaged log is.

A segment holds records, each ending in a newline, then (in the open segment) preallocated
zeros. Canonical JSON never holds a raw NUL or newline, so:

- trailing zeros are free space, never data;
- a NUL byte among the records is damage: data hidden after a zero-filled gap;
- bytes after the last newline are a torn record (the writer died mid-write, or is writing
  it now) only in the last segment, and only if no zero gap splits them; anywhere else they
  are damage.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import AuditDataError


class SegmentDamaged(AuditDataError, ValueError):
    """A segment's bytes are not records plus at most one torn final record.

    ``offset`` is the byte where the damage starts and ``records`` the number of complete
    records before it.
    """

    def __init__(self, message: str, offset: int, records: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.records = records


@dataclass(frozen=True)
class Segment:
    """A parsed segment: its complete records and the torn tail after them (if any)."""

    records: list[bytes]
    end: int            # byte offset just after the last complete record
    torn: int           # length of the torn final record (0: none)


def parse_segment(data: bytes, *, last: bool, name: str = "segment", first: int = 0) -> Segment:
    """Split segment bytes into records, or raise :class:`SegmentDamaged` naming the byte and
    the index (counting from ``first``, the segment's first record) where damage starts."""
    body = data.rstrip(b"\x00")
    end = body.rfind(b"\n") + 1
    gap = body.find(b"\x00", 0, end)
    if gap >= 0:
        before = body.count(b"\n", 0, gap)
        raise SegmentDamaged(f"{name}: data after a zero-filled gap at byte {gap} (record "
                             f"{first + before})", gap, before)
    records = (body if end == len(body) else body[:end]).split(b"\n")  # no copy if no tail
    records.pop()  # the empty string after the final newline
    tail = body[end:]
    if tail:
        if not last:
            raise SegmentDamaged(f"{name} (not the last segment) ends in a partial record at "
                                 f"byte {end} (record {first + len(records)})", end, len(records))
        if b"\x00" in tail.lstrip(b"\x00"):
            # Bytes, zeros, then more bytes: not one torn write.
            raise SegmentDamaged(f"{name}: data after a zero-filled gap at byte {end} (record "
                                 f"{first + len(records)})", end, len(records))
    return Segment(records, end, len(tail))
