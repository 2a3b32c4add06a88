"""Frames on the hub's Unix socket: a JSON header and raw byte attachments, never pickle.

    [u32 frame length][u32 header length][header: JSON object][attachment bytes ...]

The header lists the attachments' lengths under ``"_b"``; arrays travel as attachments (raw
bytes with their dtype and shape in the header), so a batch of usage rows costs one copy,
not a JSON rendering of floats. Frames beyond :data:`MAX_FRAME` are refused, so a broken or
hostile peer cannot make the other side allocate without bound.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import orjson

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">II")


class WireError(Exception):
    """The peer closed the connection or sent something that is not a frame."""


def send(sock: socket.socket, header: dict[str, Any],
         blobs: Sequence[bytes | memoryview] = ()) -> None:
    """Write one frame (the caller serialises writers on one socket)."""
    if blobs:
        header = {**header, "_b": [len(b) for b in blobs]}
    head = orjson.dumps(header)
    total = 4 + len(head) + sum(len(b) for b in blobs)
    if total > MAX_FRAME:
        raise WireError(f"frame of {total} bytes exceeds {MAX_FRAME}")
    sock.sendall(b"".join((_LEN.pack(total, len(head)), head, *blobs)))


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise WireError("connection closed")
        got += k
    return buf


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[memoryview]]:
    """Read one frame: its header and its attachments (views into one buffer)."""
    total, head_len = _LEN.unpack(_read(sock, 8))
    if total > MAX_FRAME or head_len > total - 4:
        raise WireError("malformed frame length")
    body = _read(sock, total - 4)
    try:
        header = orjson.loads(body[:head_len])
    except orjson.JSONDecodeError as err:
        raise WireError(f"frame header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not an object")
    sizes = header.pop("_b", [])
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes) \
            or head_len + sum(sizes) != len(body):
        raise WireError("frame attachments do not match their lengths")
    blobs, at, view = [], head_len, memoryview(body)
    for size in sizes:
        blobs.append(view[at:at + size])
        at += size
    return header, blobs
