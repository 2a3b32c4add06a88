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

import os
from collections.abc import Iterator
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


def parse_segment(data: bytes, *, last: bool, name: str = "segment", first: int = 0,
                  at: int = 0, before: int = 0) -> Segment:
    """Split segment bytes into records, or raise :class:`SegmentDamaged` naming the byte and
    the index (counting from ``first``, the segment's first record) where damage starts.

    ``data`` may be the rest of a segment whose first ``at`` bytes, ``before`` complete records
    free of NUL bytes, were already read (:func:`read_segment`): offsets and counts in the
    result and the error are then the segment's own. ``end`` stays relative to ``data``.
    """
    body = data.rstrip(b"\x00")
    end = body.rfind(b"\n") + 1
    gap = body.find(b"\x00", 0, end)
    if gap >= 0:
        n = before + body.count(b"\n", 0, gap)
        raise SegmentDamaged(f"{name}: data after a zero-filled gap at byte {at + gap} (record "
                             f"{first + n})", at + gap, n)
    records = (body if end == len(body) else body[:end]).split(b"\n")  # no copy if no tail
    records.pop()  # the empty string after the final newline
    tail = body[end:]
    if tail:
        n = before + len(records)
        if not last:
            raise SegmentDamaged(f"{name} (not the last segment) ends in a partial record at "
                                 f"byte {at + end} (record {first + n})", at + end, n)
        if b"\x00" in tail.lstrip(b"\x00"):
            # Bytes, zeros, then more bytes: not one torn write.
            raise SegmentDamaged(f"{name}: data after a zero-filled gap at byte {at + end} "
                                 f"(record {first + n})", at + end, n)
    return Segment(records, end, len(tail))


@dataclass
class Tail:
    """Set by :func:`read_segment` once it has read the whole segment: the torn tail's length,
    or the damage (the records before it were yielded)."""

    torn: int = 0
    damage: SegmentDamaged | None = None


def read_segment(path: str, tail: Tail, *, last: bool, name: str = "segment", first: int = 0,
                 chunk: int = 1 << 20, start: int = 0,
                 stop: int | None = None) -> Iterator[tuple[bytes, list[bytes]]]:
    """The rule of :func:`parse_segment`, applied a ``chunk`` of the file at a time: yields
    (block, records), the records being ``block``'s complete lines in order (the block may end
    in part of the next record, which the next block starts with), then sets ``tail``.

    Why: a whole segment (tens of MB) is more than glibc's largest mmap threshold, so each one
    read whole is a fresh mapping, page-faulted 4 KiB at a time (a tenth of verify's CPU time
    was this system time), and its bytes, records and parsed values stay alive together; blocks
    of about a MiB reuse the same heap memory and keep a worker small (bench/README.md).

    Same verdicts as :func:`parse_segment` on the whole file: a full block free of NUL bytes
    holds only complete records before its last newline (canonical JSON holds no raw newline
    or NUL, and every line before the segment's last newline is a record), and from the first
    block that holds a NUL (free space, or damage), or is the file's last, or has no newline,
    :func:`parse_segment` itself decides, with offsets and indexes of the whole segment. The
    zeros that end the file (an open segment's preallocated free space, tens of MB) are read a
    chunk at a time and compared with zeros, never joined or stripped byte by byte:
    :func:`parse_segment` strips them first, so dropping them changes no verdict.

    ``start`` and ``stop`` read one piece of the segment (so that workers can share a segment):
    ``start`` is 0 or just after a newline, ``first`` the index of the record there, and
    ``stop`` (None: the end of the file) just after a newline. A piece that stops before the
    end of the file is judged as bytes that must be whole records (``last`` then does not
    apply): the verdicts of the whole segment are the pieces' in order, up to the first piece
    that finds damage (the records after damage are not records).
    """
    at = start      # offset of the next block in the segment
    count = 0       # complete records yielded
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        while True:
            want = chunk if stop is None else min(chunk, stop - at)
            block = os.pread(fd, want, at)
            cut = block.rfind(b"\n") + 1
            if len(block) < chunk or not cut or b"\x00" in block:
                if len(block) == want and (stop is None or at + want < stop):
                    block = _with_rest(fd, block, at + want, chunk, stop)
                rest = block[:_data_end(block)]
                break
            records = block.split(b"\n")
            records.pop()   # the start of the next record (or b"")
            yield block, records
            count += len(records)
            at += cut
    try:
        seg = parse_segment(rest, last=last and stop is None, name=name, first=first, at=at,
                            before=count)
    except SegmentDamaged as err:
        good = rest[:err.offset - at].split(b"\n")[:err.records - count]
        if good:
            yield rest, good
        tail.damage = err
        return
    if seg.records:
        yield rest, seg.records
    tail.torn = seg.torn


def _with_rest(fd: int, block: bytes, at: int, chunk: int, stop: int | None) -> bytes:
    """``block`` followed by the file from ``at`` to ``stop`` (None: its end), less the whole
    chunks of zeros that end it (a zero chunk followed by data is kept: parse_segment names
    that gap)."""
    parts = [block]
    zero = bytes(chunk)
    zeros = 0       # zero bytes read since the last chunk holding data
    while data := os.pread(fd, chunk if stop is None else min(chunk, stop - at), at):
        at += len(data)
        if data == (zero if len(data) == chunk else bytes(len(data))):
            zeros += len(data)
            continue
        if zeros:
            parts.append(bytes(zeros))
            zeros = 0
        parts.append(data)
    return b"".join(parts) if len(parts) > 1 else block


def _data_end(data: bytes, step: int = 4096) -> int:
    """``len(data.rstrip(b"\\0"))``, comparing ``step`` bytes at a time with zeros first
    (``bytes.rstrip`` with an argument tests each byte on its own: slow on a MiB of zeros)."""
    end = len(data)
    zero = bytes(step)
    while end >= step and data[end - step:end] == zero:
        end -= step
    lo = max(end - step, 0)
    return lo + len(data[lo:end].rstrip(b"\x00"))
