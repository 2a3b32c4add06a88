"""TEMPORARY stand-in for ``gateway.audit.LogServer`` / ``RemoteAuditLog`` (helper "hostlog").

Same signatures as DESIGN-scale.md, so the supervisor, hub and workers can be built and tested
before the real classes land; deleted once they do. Length-prefixed JSON frames over a Unix
socket; every append is its own request (no batching), answered once the hub's log made the
record durable. Not tuned: benchmarks need the real one.
"""

from __future__ import annotations

import base64
import hmac
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gateway.audit import AuditLog, AuditSettings, Receipt
from gateway.errors import AuditUnavailable

_LEN = struct.Struct(">I")
_MAX_FRAME = 16 * 1024 * 1024
_instance = threading.local()


class _HubLog(AuditLog):
    """The hub's AuditLog; a record appended from a served connection names that worker."""

    @property
    def _instance(self) -> str:
        return getattr(_instance, "id", None) or self._hub_instance

    @_instance.setter
    def _instance(self, value: str) -> None:
        self._hub_instance = value


def _send(sock: socket.socket, lock: threading.Lock, message: object) -> None:
    data = orjson.dumps(message)
    with lock:
        sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("peer closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n > _MAX_FRAME:
        raise ConnectionError("frame too large")
    return orjson.loads(_recv_exact(sock, n))


_READS: dict[str, Callable[..., Any]] = {
    "size": lambda log: log.size,
    "checkpoint_age": lambda log: log.checkpoint_age,
    "healthy": lambda log: log.healthy,
    "checkpoint": lambda log: log.checkpoint(),
    "fresh_checkpoint": lambda log: log.fresh_checkpoint(),
    "entries": lambda log, a, b: [base64.b64encode(e).decode() for e in log.entries(a, b)],
    "inclusion_proof": lambda log, a, b: [h.hex() for h in log.inclusion_proof(a, b)],
    "consistency_proof": lambda log, a, b: [h.hex() for h in log.consistency_proof(a, b)],
    "root": lambda log, a: log.root(a).hex(),
    "checkpoint_note": lambda log, a: log.checkpoint_note(a),
}


class LogServer:
    def __init__(self, settings: AuditSettings, socket_path: Path, *, instance_id: str) -> None:
        self._settings, self._path, self._instance_id = settings, socket_path, instance_id
        self._pool = ThreadPoolExecutor(64, thread_name_prefix="hub-append")
        self._sock: socket.socket | None = None

    def start(self) -> None:
        self._log = _HubLog.open(self._settings, instance_id=self._instance_id)
        self._path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self._path))
        os.chmod(self._path, 0o600)
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def log(self) -> AuditLog:
        return self._log

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        try:
            hello = _recv(conn)
            instance = str(hello["instance"])
            while True:
                message = _recv(conn)
                self._pool.submit(self._handle, conn, lock, instance, message)
        except (ConnectionError, OSError, ValueError, KeyError):
            conn.close()

    def _handle(self, conn: socket.socket, lock: threading.Lock, instance: str,
                message: dict) -> None:
        op, args = message["op"], message["a"]
        try:
            if op == "append":
                _instance.id = instance
                try:
                    receipt = self._log.append(args[0], args[1])
                finally:
                    _instance.id = None
                result: object = [receipt.index, receipt.leaf_hash.hex()]
            else:
                result = _READS[op](self._log, *args)
            reply: dict[str, object] = {"i": message["i"], "r": result}
        except AuditUnavailable as err:
            reply = {"i": message["i"], "e": str(err), "t": "unavailable"}
        except Exception as err:
            reply = {"i": message["i"], "e": str(err), "t": "value"}
        try:
            _send(conn, lock, reply)
        except OSError:
            pass

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._pool.shutdown(wait=True)
        self._log.close()


class RemoteAuditLog:
    def __init__(self, socket_path: Path, settings: AuditSettings, instance_id: str) -> None:
        self._path, self._instance_id = socket_path, instance_id
        self._key = base64.b64decode(settings.payload_key.read_text().strip())
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pending: dict[int, list[Any]] = {}
        self._ids = itertools.count()
        self._closed = False
        self._on_commit: Callable[[float, int], None] | None = None

    @classmethod
    def connect(cls, socket_path: Path, settings: AuditSettings, *,
                instance_id: str) -> RemoteAuditLog:
        self = cls(socket_path, settings, instance_id)
        self._connect()
        threading.Thread(target=self._reconnect_loop, daemon=True).start()
        return self

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self._path))
            _send(sock, self._send_lock, {"instance": self._instance_id})
        except OSError:
            sock.close()
            return False
        with self._lock:
            self._sock = sock
        threading.Thread(target=self._read, args=(sock,), daemon=True).start()
        return True

    def _reconnect_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            if self._sock is None:
                if self._connect():
                    delay = 0.05
                else:
                    delay = min(delay * 2, 0.5)
            time.sleep(delay)

    def _read(self, sock: socket.socket) -> None:
        try:
            while True:
                reply = _recv(sock)
                with self._lock:
                    waiter = self._pending.pop(reply["i"], None)
                if waiter is not None:
                    waiter[1] = reply
                    waiter[0].set()
        except (ConnectionError, OSError, ValueError):
            pass
        with self._lock:
            if self._sock is sock:
                self._sock = None
            pending, self._pending = self._pending, {}
        sock.close()
        for waiter in pending.values():
            waiter[0].set()

    def _call(self, op: str, *args: object) -> Any:
        event = threading.Event()
        waiter: list[Any] = [event, None]
        with self._lock:
            sock = self._sock
            if sock is None:
                raise AuditUnavailable("the audit log's hub is not reachable")
            i = next(self._ids)
            self._pending[i] = waiter
        try:
            _send(sock, self._send_lock, {"i": i, "op": op, "a": list(args)})
        except OSError as err:
            raise AuditUnavailable(f"the audit log's hub is not reachable: {err}") from None
        event.wait()
        reply = waiter[1]
        if reply is None:
            raise AuditUnavailable("the audit log's hub went away")
        if "e" in reply:
            if reply["t"] == "unavailable":
                raise AuditUnavailable(reply["e"])
            raise ValueError(reply["e"])
        return reply["r"]

    def append(self, kind: str, fields: Mapping[str, object]) -> Receipt:
        started = time.perf_counter()
        index, leaf = self._call("append", kind, dict(fields))
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started, 1)
        return Receipt(index, bytes.fromhex(leaf))

    def announce(self) -> None:
        pass

    def payload_digest(self, *chunks: bytes) -> str:
        mac = hmac.new(self._key, digestmod="sha256")
        for c in chunks:
            mac.update(c)
        return mac.hexdigest()

    @property
    def healthy(self) -> bool:
        if self._sock is None:
            return False
        try:
            return bool(self._call("healthy"))
        except AuditUnavailable:
            return False

    @property
    def size(self) -> int:
        return int(self._call("size"))

    @property
    def checkpoint_age(self) -> float:
        return float(self._call("checkpoint_age"))

    def observe_commits(self, callback: Callable[[float, int], None]) -> None:
        self._on_commit = callback

    def checkpoint(self) -> str | None:
        return self._call("checkpoint")

    def fresh_checkpoint(self) -> str | None:
        return self._call("fresh_checkpoint")

    def entries(self, start: int, end: int) -> list[bytes]:
        return [base64.b64decode(e) for e in self._call("entries", start, end)]

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return [bytes.fromhex(h) for h in self._call("inclusion_proof", index, size)]

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return [bytes.fromhex(h) for h in self._call("consistency_proof", first, second)]

    def root(self, size: int) -> bytes:
        return bytes.fromhex(self._call("root", size))

    def checkpoint_note(self, size: int) -> str | None:
        return self._call("checkpoint_note", size)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sock = self._sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
