"""The hub's audit socket protocol: length-prefixed binary frames over a Unix stream socket.

A frame is a 5-byte header (body length, u32 big-endian; frame type, u8) and a body of fixed
binary layouts: integers and length-prefixed byte strings. Record fields travel as their RFC
8785 bytes. Nothing is unpickled or evaluated: a peer's bytes are only ever parsed as these
layouts, so a socket peer cannot make the hub run code, and a malformed frame raises
:class:`FrameError` (the hub then closes that connection, and only that one)::

    worker (RemoteAuditLog)                 hub (LogServer)
    HELLO    version, instance id       ->
                                        <-  WELCOME  version
    APPEND   id, [(kind, fields)]       ->  sequenced into the hub's log, one commit
                                        <-  APPENDED id, healthy, commit seconds,
                                                     [(index, leaf hash) | (code, message)]
    CALL     id, method, a, b           ->
                                        <-  RESULT   id, healthy, code, [bytes]
                                        <-  ERROR    message (the hub closes the connection)

Replies to one connection come in the order of its requests, and each APPEND is answered
only once all its records are durable.
"""

from __future__ import annotations

import socket
import struct

from gateway.errors import AuditDataError

VERSION = 1

# Frame types.
HELLO, WELCOME, APPEND, APPENDED, CALL, RESULT, ERROR = 1, 2, 3, 4, 5, 6, 7

# Result codes: each names the one exception class the client raises (never a class the
# peer picks by name).
OK, DATA, UNAVAILABLE, PROOF = 0, 1, 2, 3

# CALL methods: the log's reads.
(CHECKPOINT, FRESH_CHECKPOINT, ENTRIES, INCLUSION_PROOF, CONSISTENCY_PROOF, ROOT,
 CHECKPOINT_NOTE, STATUS) = range(1, 9)

#: Largest frame body a hub accepts from a worker; a bigger one closes the connection.
MAX_REQUEST = 16 << 20
#: Largest frame body a worker accepts from its hub.
MAX_REPLY = 256 << 20
#: Most bytes of one record's fields (so any single record fits a frame).
MAX_FIELDS = MAX_REQUEST - 1024
#: Most records one APPEND frame may carry (bounds the work and the reply one frame causes).
MAX_RECORDS = 16384
#: Most records one ENTRIES read returns (the worker pages).
MAX_ENTRIES = 1000
#: Longest instance id a worker may name itself with.
MAX_INSTANCE = 256

HEADER = struct.Struct("!IB")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_APPEND = struct.Struct("!II")           # request id, records
_ITEM = struct.Struct("!BI")             # kind length, fields length
_APPENDED = struct.Struct("!IBdI")       # request id, healthy, commit seconds, records
_RECEIPT = struct.Struct("!BQ32s")       # OK, index, leaf hash
_FAILED = struct.Struct("!BH")           # code, message length
_CALL = struct.Struct("!IBqq")           # request id, method, two integer arguments
_RESULT = struct.Struct("!IBBI")         # request id, healthy, code, items
_STATUS = struct.Struct("!Qd")           # size, checkpoint age (seconds)


class FrameError(AuditDataError):
    """A frame that does not follow the protocol (too large, truncated, inconsistent)."""


def frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), kind) + body


class FrameReader:
    """Reads whole frames from a stream socket, refusing any body over ``limit`` bytes."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._buf = bytearray()

    def read(self) -> tuple[int, bytes] | None:
        """The next ``(type, body)``; None at a clean end of stream (between frames).

        A socket timeout propagates (the buffered part of a frame is kept, so the caller may
        read again); a truncated or oversized frame raises :class:`FrameError`.
        """
        buf = self._buf
        want = HEADER.size
        while True:
            if len(buf) >= HEADER.size:
                length, kind = HEADER.unpack_from(buf)
                if length > self._limit:
                    raise FrameError(f"frame of {length} bytes exceeds the limit of "
                                     f"{self._limit}")
                want = HEADER.size + length
                if len(buf) >= want:
                    body = bytes(buf[HEADER.size:want])
                    del buf[:want]
                    return kind, body
            chunk = self._sock.recv(max(want - len(buf), 1 << 16))
            if not chunk:
                if buf:
                    raise FrameError("connection closed in the middle of a frame")
                return None
            buf += chunk


# -- handshake ------------------------------------------------------------------------------

def hello(instance: str) -> bytes:
    return frame(HELLO, _U16.pack(VERSION) + instance.encode())


def parse_hello(body: bytes) -> str:
    """The instance id a worker names itself with (checked: version, length, UTF-8)."""
    if len(body) < _U16.size or _U16.unpack_from(body)[0] != VERSION:
        raise FrameError(f"unsupported protocol version (this hub speaks {VERSION})")
    raw = body[_U16.size:]
    if not 0 < len(raw) <= MAX_INSTANCE:
        raise FrameError(f"instance id must be 1 to {MAX_INSTANCE} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise FrameError("instance id is not UTF-8") from None


def welcome() -> bytes:
    return frame(WELCOME, _U16.pack(VERSION))


def check_welcome(body: bytes) -> None:
    if len(body) != _U16.size or _U16.unpack(body)[0] != VERSION:
        raise FrameError(f"the hub speaks another protocol version (this worker speaks "
                         f"{VERSION})")


# -- appends --------------------------------------------------------------------------------

def item(kind: bytes, fields: bytes) -> bytes:
    """One record of an APPEND frame: ``kind`` (1-255 bytes) and its canonical fields."""
    return _ITEM.pack(len(kind), len(fields)) + kind + fields


def append(request: int, items: list[bytes]) -> bytes:
    body = b"".join((_APPEND.pack(request, len(items)), *items))
    return HEADER.pack(len(body), APPEND) + body


def parse_append(body: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The request id and the ``(kind, fields)`` byte strings of an APPEND frame."""
    if len(body) < _APPEND.size:
        raise FrameError("APPEND frame too short")
    request, count = _APPEND.unpack_from(body)
    if count > MAX_RECORDS:
        raise FrameError(f"APPEND frame of {count} records exceeds the limit of {MAX_RECORDS}")
    pos, end = _APPEND.size, len(body)
    out = []
    for _ in range(count):
        if pos + _ITEM.size > end:
            raise FrameError("APPEND frame holds fewer records than it says")
        klen, flen = _ITEM.unpack_from(body, pos)
        pos += _ITEM.size
        if pos + klen + flen > end:
            raise FrameError("APPEND record runs past the end of its frame")
        out.append((body[pos:pos + klen], body[pos + klen:pos + klen + flen]))
        pos += klen + flen
    if pos != end:
        raise FrameError("APPEND frame has bytes after its last record")
    return request, out


def receipt(index: int, leaf: bytes) -> bytes:
    return _RECEIPT.pack(OK, index, leaf)


def failed(code: int, message: str) -> bytes:
    raw = message.encode()[:512]
    return _FAILED.pack(code, len(raw)) + raw


def appended(request: int, healthy: bool, seconds: float, results: list[bytes]) -> bytes:
    body = b"".join((_APPENDED.pack(request, healthy, seconds, len(results)), *results))
    return HEADER.pack(len(body), APPENDED) + body


def parse_appended(body: bytes) -> tuple[int, bool, float, list[tuple[int, int, bytes | str]]]:
    """Request id, hub health, commit seconds, and per record ``(OK, index, leaf hash)`` or
    ``(code, 0, message)``."""
    if len(body) < _APPENDED.size:
        raise FrameError("APPENDED frame too short")
    request, healthy, seconds, count = _APPENDED.unpack_from(body)
    pos, end = _APPENDED.size, len(body)
    out: list[tuple[int, int, bytes | str]] = []
    for _ in range(count):
        if pos >= end:
            raise FrameError("APPENDED frame holds fewer results than it says")
        if body[pos] == OK:
            if pos + _RECEIPT.size > end:
                raise FrameError("APPENDED receipt runs past the end of its frame")
            out.append(_RECEIPT.unpack_from(body, pos))
            pos += _RECEIPT.size
        else:
            if pos + _FAILED.size > end:
                raise FrameError("APPENDED result runs past the end of its frame")
            code, n = _FAILED.unpack_from(body, pos)
            pos += _FAILED.size
            out.append((code, 0, body[pos:pos + n].decode(errors="replace")))
            pos += n
    if pos != end:
        raise FrameError("APPENDED frame has bytes after its last result")
    return request, bool(healthy), seconds, out


# -- reads ----------------------------------------------------------------------------------

def call(request: int, method: int, a: int = 0, b: int = 0) -> bytes:
    return frame(CALL, _CALL.pack(request, method, a, b))


def parse_call(body: bytes) -> tuple[int, int, int, int]:
    if len(body) != _CALL.size:
        raise FrameError("CALL frame has the wrong size")
    request, method, a, b = _CALL.unpack(body)
    return request, method, a, b


def result(request: int, healthy: bool, code: int, items: list[bytes]) -> bytes:
    parts = [_RESULT.pack(request, healthy, code, len(items))]
    for i in items:
        parts += (_U32.pack(len(i)), i)
    body = b"".join(parts)
    return HEADER.pack(len(body), RESULT) + body


def parse_result(body: bytes) -> tuple[int, bool, int, list[bytes]]:
    if len(body) < _RESULT.size:
        raise FrameError("RESULT frame too short")
    request, healthy, code, count = _RESULT.unpack_from(body)
    pos, items = _RESULT.size, []
    for _ in range(count):
        if pos + _U32.size > len(body):
            raise FrameError("RESULT frame holds fewer items than it says")
        (n,) = _U32.unpack_from(body, pos)
        pos += _U32.size
        if pos + n > len(body):
            raise FrameError("RESULT item runs past the end of its frame")
        items.append(body[pos:pos + n])
        pos += n
    if pos != len(body):
        raise FrameError("RESULT frame has bytes after its last item")
    return request, bool(healthy), code, items


def status(size: int, age: float) -> bytes:
    return _STATUS.pack(size, age)


def parse_status(raw: bytes) -> tuple[int, float]:
    if len(raw) != _STATUS.size:
        raise FrameError("STATUS result has the wrong size")
    size, age = _STATUS.unpack(raw)
    return size, age


def error(message: str) -> bytes:
    return frame(ERROR, message.encode()[:4096])
