"""The hub's side of the ``host`` backend: :class:`StateServer` (see :mod:`._host`).

Only processes of the hub's own user may connect (checked with ``SO_PEERCRED`` as well as by
the socket's mode). The hub keeps the buckets and the desired state in memory: when it
restarts, buckets start full and (unless it was given a ``state_file``) the desired state
starts empty, while each worker keeps what it applied. A supervisor that wants a restarted
hub to replay the desired state to later workers passes ``state_file`` (a file under its
runtime directory, written atomically, 0600, on every change), and removes it when the
gateway itself starts, so the desired state outlives a hub but not the gateway (as in one
process, where a model unloaded by an admin call is loaded again at the next start).

``on_usage(member, batch)`` receives the workers' background-scoring rows (the hub's
``Monitor.score_usage``); it runs on that worker's connection thread, so it should queue.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gateway._atomic import private_dir, write_atomic
from gateway.state._local import LocalBuckets
from gateway.state._types import Applied
from gateway.state._usage import Usage, UsageHandler
from gateway.state._wire import WireError, recv, send

log = logging.getLogger("gateway.state")

_PEERCRED = struct.Struct("3i")
#: Array kinds accepted in usage batches: numbers only (never object arrays).
_NUMERIC = frozenset("biuf")
#: Profiles the hub keeps parsed-ready by digest.
_PROFILES = 256


class _Peer:
    __slots__ = ("member", "sock", "topics", "wlock")

    def __init__(self, sock: socket.socket, member: str) -> None:
        self.sock = sock
        self.member = member
        self.topics: set[str] = set()
        self.wlock = threading.Lock()

    def send(self, header: dict[str, Any]) -> bool:
        try:
            with self.wlock:
                send(self.sock, header)
            return True
        except (OSError, WireError):
            return False


class StateServer:
    """The hub's side: buckets, desired state and usage intake for every worker of a host."""

    def __init__(self, socket_path: Path, *, state_file: Path | None = None,
                 on_usage: UsageHandler | None = None, max_keys: int = 100_000) -> None:
        self.socket_path = Path(socket_path)
        self.state_file = state_file
        self.on_usage = on_usage
        self.buckets = LocalBuckets(max_keys=max_keys)
        self._lock = threading.Lock()
        self._desired: dict[str, dict[str, dict[str, object]]] = {}
        self._peers: set[_Peer] = set()
        self._pending: dict[int, tuple[str, threading.Event, list[Any]]] = {}
        self._ids = itertools.count(1)
        self._listener: socket.socket | None = None
        self._profiles: dict[str, bytes] = {}
        self._stopping = threading.Event()

    # -- lifecycle

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve in background threads."""
        path = self.socket_path
        self._stopping.clear()
        private_dir(path.parent)
        if self.state_file is not None and self.state_file.exists():
            self._desired = orjson.loads(self.state_file.read_bytes())
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="state-accept", daemon=True).start()

    def stop(self) -> None:
        """Stop serving: close the socket and every connection (workers then fail closed)."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)

    @property
    def members(self) -> list[str]:
        """Members subscribed to at least one topic, now."""
        with self._lock:
            return sorted({p.member for p in self._peers if p.topics})

    def desired(self, topic: str) -> dict[str, dict[str, object]]:
        with self._lock:
            return dict(self._desired.get(topic, {}))

    # -- serving

    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None and not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="state-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        peer: _Peer | None = None
        try:
            _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            if uid != os.getuid():
                log.warning("state hub: refused a connection from uid %d", uid)
                return
            hello, _ = recv(conn)
            if hello.get("op") != "hello":
                return
            peer = _Peer(conn, str(hello.get("member", "?")))
            with self._lock:
                self._peers.add(peer)
            while True:
                header, blobs = recv(conn)
                self._handle(peer, header, blobs)
        except (OSError, WireError, ValueError, TypeError, KeyError) as err:
            if not isinstance(err, WireError | ConnectionError):
                log.warning("state hub: dropped a connection after a bad request: %r", err)
        finally:
            if peer is not None:
                with self._lock:
                    self._peers.discard(peer)
            conn.close()

    def _handle(self, peer: _Peer, h: dict[str, Any], blobs: list[memoryview]) -> None:
        op = h.get("op")
        if op == "lease":
            granted, left = self.buckets.lease(str(h["k"]), float(h["r"]), int(h["b"]),
                                               int(h["n"]), int(h["w"]))
            peer.send({"g": granted, "l": left})
        elif op == "release":
            self.buckets.give_back(str(h["k"]), float(h["r"]), int(h["b"]), int(h["n"]))
        elif op == "usage":
            self._usage(peer.member, h, blobs)
        elif op == "subscribe":
            topic = str(h["topic"])
            with self._lock:  # the replay leaves before any later change is pushed
                peer.topics.add(topic)
                items = list(self._desired.get(topic, {}).items())
                peer.send({"op": "replay", "id": h["id"], "topic": topic, "items": items})
        elif op == "answer":
            with self._lock:
                pending = self._pending.get(int(h["id"]))
            if pending is not None:
                pending[2].append((bool(h["ok"]), str(h.get("detail", ""))))
                pending[1].set()
        elif op == "apply":
            answers = self.apply_everywhere(str(h["topic"]), str(h["key"]), h["payload"],
                                            float(h["timeout"]))
            peer.send({"answers": [[a.member, a.ok, a.detail] for a in answers]})
        elif op == "ping":
            peer.send({"op": "pong"})
        else:
            raise ValueError(f"unknown operation {op!r}")

    def apply_everywhere(self, topic: str, key: str, payload: Mapping[str, object],
                         timeout: float) -> list[Applied]:
        """Store the desired state, push it to every subscribed worker, collect answers."""
        waits: list[tuple[int, str, threading.Event, list[Any]]] = []
        with self._lock:
            self._desired.setdefault(topic, {})[key] = dict(payload)
            if self.state_file is not None:
                write_atomic(self.state_file, orjson.dumps(self._desired), mode=0o600)
            for peer in self._peers:
                if topic not in peer.topics:
                    continue
                push_id = next(self._ids)
                entry: tuple[str, threading.Event, list[Any]] = (
                    peer.member, threading.Event(), [])
                self._pending[push_id] = entry
                if not peer.send({"op": "apply", "id": push_id, "topic": topic, "key": key,
                                  "payload": dict(payload)}):
                    entry[2].append((False, "its connection to the hub broke"))
                    entry[1].set()
                waits.append((push_id, *entry))
        deadline = time.monotonic() + timeout
        answers = []
        for push_id, member, event, result in waits:
            event.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                self._pending.pop(push_id, None)
            if result:
                ok, detail = result[0]
                answers.append(Applied(member, ok, detail))
            else:
                answers.append(Applied(member, False, f"no answer within {timeout:g} s"))
        return sorted(answers, key=lambda a: a.member)

    def _usage(self, member: str, h: dict[str, Any], blobs: list[memoryview]) -> None:
        if self.on_usage is None:
            return
        batch = usage_batch(h, blobs, self._profiles)
        try:
            self.on_usage(member, batch)
        except Exception:  # scoring must not take the hub's connection down
            log.exception("state hub: usage handler failed")


def usage_batch(h: dict[str, Any], blobs: Sequence[memoryview],
                profiles: dict[str, bytes]) -> list[Usage]:
    """The usage rows of one sent batch (header ``h``, its attachments ``blobs``), for the
    hub's socket and the PostgreSQL table alike. A batch names each profile once, by digest:
    ``profiles`` keeps those already seen (at most ``_PROFILES``) for the batches after it."""
    for digest, index in h.get("profiles", {}).items():
        if len(profiles) >= _PROFILES:
            profiles.clear()
        profiles[str(digest)] = bytes(blobs[int(index)])
    return [Usage(str(model), str(caller), _array(blobs[xi], xdt, xshape),
                  None if yi < 0 else _array(blobs[yi], ydt, yshape),
                  profiles.get(digest, b"") if digest else b"", str(digest or ""))
            for model, caller, digest, xdt, xshape, xi, ydt, yshape, yi in h["items"]]


def _array(blob: memoryview, dtype: str, shape: Sequence[int]) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind not in _NUMERIC:
        raise ValueError(f"usage array of dtype {dtype} refused")
    return np.frombuffer(blob, dtype=dt).reshape(tuple(int(s) for s in shape))
