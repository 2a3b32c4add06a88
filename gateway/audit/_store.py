"""The file store: newline-terminated canonical records in preallocated segment files.

Layout of the log directory::

    segments/<first index, 20 digits>.log   records, one per line, zero-filled tail
    checkpoint                               latest signed checkpoint (C2SP note, byte for byte)
    checkpoints.jsonl                        every signed checkpoint, one JSON string per line
    commit-tags                              the last two commit tags (see ``_tags.py``)

Segments are preallocated (``posix_fallocate``) so that a group commit is a ``pwrite`` plus an
``fdatasync`` that does not have to grow the file, which commits sooner than appending to a
growing file (figures in bench/README.md). The end of data is therefore not the file size: it is the
last newline before the zero tail. Canonical JSON never contains a raw NUL or newline, so that
boundary is unambiguous. A sealed (non-last) segment is truncated to its data.

Preallocated blocks stay "unwritten" until first written, and the first durable write into one
also commits its conversion to the filesystem journal. So the store writes zeros a megabyte
ahead of the records (:data:`ZERO_AHEAD`), and a commit's flush then carries data alone, at
the price of one 1 MiB write every megabyte of records (figures in bench/README.md).

Storage sits behind this small class (the :class:`Store` protocol below). The PostgreSQL log
of several replicas (``_pglog``) is not a Store: there the index and the chain head must be
assigned inside the database, under its lock, so it is a writer of its own over the same
record, hash, checkpoint and proof code.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway._atomic import fsync_dir, private_dir, write_atomic
from gateway.audit._segment import SegmentDamaged, parse_segment
from gateway.audit._tags import SLOT_BYTES, SLOTS, TAGS
from gateway.errors import AuditDataError

SEGMENTS = "segments"
CHECKPOINT = "checkpoint"
CHECKPOINTS = "checkpoints.jsonl"
_NAME_DIGITS = 20


class StoreDamaged(AuditDataError):
    """The stored log is damaged in a way that is not a torn final record."""


@dataclass(frozen=True)
class TornTail:
    """What recovery cut off: the bytes after the last complete record of the last segment."""

    segment: str
    offset: int
    length: int


def segment_name(first: int) -> str:
    return f"{first:0{_NAME_DIGITS}d}.log"




def scan_segments(directory: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """Segments in index order, and the names of files that are not segments (a ``.tmp``
    file is a segment being made, neither): the one rule, for the log and for ``verify``."""
    seg_dir = directory / SEGMENTS
    out, strays = [], []
    for p in seg_dir.iterdir() if seg_dir.is_dir() else ():
        stem = p.name.removesuffix(".log")
        if p.name.endswith(".log") and len(stem) == _NAME_DIGITS and stem.isdigit():
            out.append((int(stem), p))
        elif not p.name.endswith(".tmp"):
            strays.append(p.name)
    out.sort()
    return out, sorted(strays)


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segments in index order; a file that is not one is damage."""
    segments, strays = scan_segments(directory)
    if strays:
        raise StoreDamaged(f"unexpected file {directory / SEGMENTS / strays[0]} in the segment "
                           "directory")
    return segments


def read_data(path: Path) -> bytes:
    """The bytes of a segment up to its zero-filled tail, without reading the tail.

    Readers use this on the open segment, which is mostly preallocated zeros; recovery reads
    the whole file instead, to notice data after a zero gap.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            end = m.find(b"\x00")
            return m[:size if end < 0 else end]


def split_records(data: bytes) -> tuple[list[bytes], bytes]:
    """Split segment bytes into complete records and the trailing partial bytes (if any)."""
    data = data.rstrip(b"\x00")
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")
    lines.pop()  # the empty string after the final newline
    return lines, data[end:]


def read_records(directory: Path) -> Iterator[tuple[int, str, list[bytes], bytes]]:
    """Yield (first index, segment name, records, trailing partial bytes) per segment."""
    for first, path in list_segments(directory):
        records, tail = split_records(read_data(path))
        yield first, path.name, records, tail


def read_checkpoints(directory: Path) -> list[str]:
    """Every signed checkpoint the log published, oldest first (a torn last line is skipped)."""
    path = directory / CHECKPOINTS
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    notes = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            note = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break  # torn final line: the gateway died while appending it
            raise StoreDamaged(f"{path}: line {i + 1} is not a JSON string") from None
        if not isinstance(note, str):
            raise StoreDamaged(f"{path}: line {i + 1} is not a JSON string")
        notes.append(note)
    return notes


class Store(Protocol):
    """What the log needs from its storage: the file store is the embedded default; a shared
    store for several gateway replicas (PostgreSQL) implements the same ten methods."""

    def open(self, on_segment: Callable[[int, list[bytes]], None]) -> TornTail | None:
        """Replay every stored record (in order) to ``on_segment``; report a torn tail."""

    def cut(self, size: int) -> tuple[str, int, bytes]:
        """Remove what follows record ``size`` (in the last segment): records never
        acknowledged and a torn final record found by :meth:`open`."""

    def append(self, records: list[bytes], tag: tuple[int, bytes] | None = None) -> None:
        """Make ``records``, then commit tag ``(slot, line)``, durable before returning
        (raise ``OSError`` if not; then neither counts)."""

    def read_tags(self) -> list[bytes]:
        """The stored commit tag slots."""

    def write_tag(self, slot: int, data: bytes) -> None:
        """Durably replace commit tag ``slot`` (raise ``OSError`` if not)."""

    def read(self, start: int, end: int) -> list[bytes]:
        """Records ``[start, end)``."""

    def publish(self, note: str) -> None:
        """Durably publish a signed checkpoint (and keep it in the history)."""

    def latest_checkpoint(self) -> str | None: ...

    def last_published(self) -> str | None: ...

    def close(self) -> None: ...


#: Write commit tags with O_DIRECT where the filesystem allows it (see FileStore._open_tags);
#: tests turn it off to run the O_DSYNC path on this machine's filesystems.
DIRECT_TAGS = True

#: How far ahead of the records the open segment is zero-written (see the module docstring).
ZERO_AHEAD = 1 << 20


class FileStore:
    """Segment files of one log directory, opened for appending by one writer."""

    def __init__(self, directory: Path, segment_bytes: int, segment_seconds: int,
                 preallocate: bool) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._segment_seconds = segment_seconds
        self._preallocate = preallocate
        self._fd = -1
        self._first = 0          # index of the first record in the open segment
        self._offset = 0         # end of durable data in the open segment
        self._capacity = 0       # bytes allocated in the open segment
        self._zeroed = 0         # the open segment is zero-written up to here (if preallocated)
        self._dirty = 0          # bytes past _offset that a failed write may have left
        self._opened_at = 0.0
        self._end = 0            # end of the bytes recovery found (a torn tail included)
        self._tag_fd = -1
        # Commit tags written with O_DIRECT ride the records' flush (see _open_tags).
        self._tag_buf: mmap.mmap | None = None
        # Record end offsets: per segment (first index, array of end offsets).
        self._segments: list[tuple[int, Path, array]] = []
        self.size = 0

    # -- open and recovery ------------------------------------------------------------------

    def open(self, on_segment: Callable[[int, list[bytes]], None]) -> TornTail | None:
        """Open (creating if needed); hand each segment's records to ``on_segment``.

        Returns what was cut as a torn tail. Raises :class:`StoreDamaged` for anything that is
        not a torn final record. Records are passed a segment at a time, never all at once.
        """
        seg_dir = self.directory / SEGMENTS
        created = not seg_dir.exists()
        private_dir(seg_dir)
        if created:
            fsync_dir(self.directory)
        self._repair_history()
        self._open_tags()
        segs = list_segments(self.directory)
        count = 0
        torn = None
        for n, (first, path) in enumerate(segs):
            if first != count:
                raise StoreDamaged(f"segment {path.name} starts at index {first} but the "
                                   f"segments before it hold {count} records")
            try:  # the one rule verify uses too (gateway/audit/_segment.py)
                seg = parse_segment(path.read_bytes(), last=n == len(segs) - 1,
                                    name=f"segment {path.name}", first=first)
            except SegmentDamaged as err:
                raise StoreDamaged(str(err)) from None
            recs = seg.records
            if seg.torn:
                torn = TornTail(path.name, seg.end, seg.torn)
            offs = array("Q")
            pos = 0
            for r in recs:
                pos += len(r) + 1
                offs.append(pos)
            self._segments.append((first, path, offs))
            on_segment(first, recs)
            count += len(recs)
        self.size = count
        if not self._segments:
            self._new_segment(0)
        else:
            first, path, offs = self._segments[-1]
            self._fd = os.open(path, os.O_RDWR | os.O_DSYNC)
            self._first = first
            self._offset = offs[-1] if offs else 0
            self._capacity = os.fstat(self._fd).st_size
            self._zeroed = self._offset
            self._opened_at = time.monotonic()
        self._end = self._offset + (torn.length if torn else 0)
        return torn

    def cut(self, size: int) -> tuple[str, int, bytes]:
        """Zero everything after record ``size`` of the last segment (records and a torn
        tail), once the caller has decided that none of it was acknowledged.

        Returns the segment's name, the offset cut at, and the bytes cut (for the record of
        the cut). The zeros are durable before this returns.
        """
        first, path, offs = self._segments[-1]
        keep = size - first
        if keep < 0:
            raise ValueError(f"cannot cut at record {size}: the last segment starts at {first}")
        start = offs[keep - 1] if keep else 0
        cut = os.pread(self._fd, self._end - start, start)
        del offs[keep:]
        self._offset, self._end, self.size = start, start, size
        self._dirty = len(cut)
        self._zero_dirty()
        os.fsync(self._fd)
        return path.name, start, cut

    # -- commit tags --------------------------------------------------------------------------

    def _open_tags(self) -> None:
        """Open the commit tag slots, creating them zero-filled (and durable) if absent.

        Where the filesystem allows ``O_DIRECT``, a tag is one aligned 4 KiB write that goes
        to the device without a flush, just before the commit's records are written with
        ``O_DSYNC``, whose flush then makes both durable: one flush and two system calls per
        commit. So a tag can outlive its records (a crash between the two writes, or a power
        loss before the flush); they were never acknowledged, and the previous tag still
        covers everything that was (``_recovery.Recovery.last_tag``). Elsewhere the tag is a
        second ``O_DSYNC`` write after the records' (two flushes per commit).
        """
        path = self.directory / TAGS
        if not path.exists():
            write_atomic(path, bytes(SLOTS * SLOT_BYTES), mode=0o600)
        try:
            if not DIRECT_TAGS:
                raise OSError("commit tags without O_DIRECT")
            self._tag_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            self._tag_buf = mmap.mmap(-1, SLOT_BYTES)  # page-aligned, as O_DIRECT needs
        except OSError:
            self._tag_fd = os.open(path, os.O_RDWR | os.O_DSYNC)

    def read_tags(self) -> list[bytes]:
        data = (self.directory / TAGS).read_bytes()  # buffered: O_DIRECT writes show here
        return [data[i * SLOT_BYTES:(i + 1) * SLOT_BYTES] for i in range(SLOTS)]

    def _put_tag(self, slot: int, data: bytes) -> None:
        """Write one slot: with O_DIRECT to the device (no flush), else durably (O_DSYNC)."""
        buf = self._tag_buf
        out: bytes | mmap.mmap = data
        if buf is not None:
            buf[:] = data.ljust(SLOT_BYTES, b"\0")
            out = buf
        if os.pwrite(self._tag_fd, out, slot * SLOT_BYTES) != len(out):
            raise OSError(f"short write of commit tag slot {slot}")

    def write_tag(self, slot: int, data: bytes) -> None:
        """Durably replace one commit tag slot (no records with it: at open and close)."""
        self._put_tag(slot, data)
        if self._tag_buf is not None:
            os.fdatasync(self._tag_fd)

    def _repair_history(self) -> None:
        """Cut a checkpoint line torn by a crash, so the next one is not appended to it."""
        hist = self.directory / CHECKPOINTS
        try:
            data = hist.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            os.truncate(hist, data.rfind(b"\n") + 1)
            fd = os.open(hist, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _new_segment(self, first: int) -> None:
        path = self.directory / SEGMENTS / segment_name(first)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DSYNC, 0o600)
        try:
            if self._preallocate:
                os.posix_fallocate(fd, 0, self._segment_bytes)
            os.fsync(fd)
            fsync_dir(path.parent)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._fd, self._first, self._offset, self._dirty, self._zeroed = fd, first, 0, 0, 0
        self._capacity = os.fstat(fd).st_size
        self._opened_at = time.monotonic()
        self._segments.append((first, path, array("Q")))

    def _seal(self) -> None:
        """Cut the open segment to its data so that a backup holds no zero tail."""
        os.ftruncate(self._fd, self._offset)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def _zero_dirty(self) -> None:
        """Erase what a failed write may have left past the durable end."""
        if self._dirty:
            capacity = max(self._capacity, self._offset)
            if os.fstat(self._fd).st_size > capacity:
                os.ftruncate(self._fd, capacity)
            end = min(self._offset + self._dirty, capacity)
            if end > self._offset:
                os.pwrite(self._fd, bytes(end - self._offset), self._offset)
            self._dirty = 0

    # -- appending ----------------------------------------------------------------------------

    def append(self, records: list[bytes], tag: tuple[int, bytes] | None = None) -> None:
        """Write ``records``, then commit tag ``tag`` (slot, line), and make both durable.

        With O_DIRECT tags the tag goes first and the records' flush carries it (see
        :meth:`_open_tags`); otherwise it follows the records. On an OSError nothing is
        counted as written; the bytes a failed write may have left are zeroed before the next
        write, so they never surface as records after a restart, and a tag that may have
        landed for them is erased.
        """
        data = b"\n".join(records) + b"\n"
        if self._fd < 0:
            self._new_segment(self.size)
        self._zero_dirty()
        rotate = self._offset and (
            self._offset + len(data) > self._segment_bytes
            or (self._segment_seconds
                and time.monotonic() - self._opened_at >= self._segment_seconds))
        if rotate:
            self._seal()
            self._new_segment(self.size)
        direct = tag is not None and self._tag_buf is not None
        try:
            if tag is not None and direct:
                self._put_tag(*tag)
            # The fd is O_DSYNC: each pwrite returns once its data (and, when the file grows,
            # its size) is on disk, so a commit is one system call, not write + fdatasync.
            view = memoryview(data)
            pos = self._offset
            if self._preallocate:
                self._zero_ahead(pos + len(data))
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
            self._capacity = max(self._capacity, pos)
            if tag is not None and not direct:
                self._put_tag(*tag)
        except OSError:
            self._dirty = len(data)
            if tag is not None and direct:
                with contextlib.suppress(OSError):  # its records failed: erase the tag
                    self.write_tag(tag[0], b"")
            raise
        offs = self._segments[-1][2]
        end = self._offset
        for r in records:
            end += len(r) + 1
            offs.append(end)
        self._offset = end
        self.size += len(records)

    def _zero_ahead(self, end: int) -> None:
        """Zero-write the preallocated space past ``end`` if it is not already.

        Only bytes past the durable data are written, and only with zeros, so a crash here
        leaves nothing that recovery could mistake for a record.
        """
        if self._zeroed >= min(end, self._capacity):
            return
        start = max(self._zeroed, self._offset)
        stop = min(end + ZERO_AHEAD, self._capacity)
        if stop > start:
            os.pwrite(self._fd, bytes(stop - start), start)
        self._zeroed = stop

    # -- reading ------------------------------------------------------------------------------

    def read(self, start: int, end: int) -> list[bytes]:
        """Records ``[start, end)`` (must be durable)."""
        out: list[bytes] = []
        for first, path, offs in self._segments:
            n = len(offs)
            if end <= first or start >= first + n:
                continue
            lo, hi = max(start, first) - first, min(end, first + n) - first
            a = offs[lo - 1] if lo else 0
            b = offs[hi - 1]
            with open(path, "rb") as f:
                f.seek(a)
                chunk = f.read(b - a)
            out.extend(chunk[:-1].split(b"\n"))
        return out

    # -- checkpoints --------------------------------------------------------------------------

    def publish(self, note: str) -> None:
        """Append ``note`` to the history, then atomically replace ``checkpoint``."""
        line = json.dumps(note, ensure_ascii=False).encode() + b"\n"
        hist = self.directory / CHECKPOINTS
        fd = os.open(hist, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        write_atomic(self.directory / CHECKPOINT, note.encode())

    def latest_checkpoint(self) -> str | None:
        try:
            return (self.directory / CHECKPOINT).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def last_published(self) -> str | None:
        """The last complete line of the checkpoint history (read from the file's tail only).

        ``publish`` appends here before it replaces ``checkpoint``, so this is never older
        than ``checkpoint``; checking both means deleting one does not unpin the log.
        """
        path = self.directory / CHECKPOINTS
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(size - 16384, 0))
                tail = f.read()
        except FileNotFoundError:
            return None
        lines = [line for line in tail.split(b"\n") if line]
        if not tail.endswith(b"\n") and lines:
            lines.pop()  # torn by a crash
        for line in reversed(lines):
            try:
                note = json.loads(line)
            except ValueError:
                continue  # the first line of the tail may be cut
            if isinstance(note, str):
                return note
        return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tag_fd >= 0:
            os.close(self._tag_fd)
            self._tag_fd = -1
        if self._tag_buf is not None:
            self._tag_buf.close()
            self._tag_buf = None
