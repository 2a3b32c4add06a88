"""The ``host`` backend: one hub process serves the state every worker process of a host shares.

    server = StateServer(Path("var/run/state.sock"), on_usage=hub_monitor.score_usage)
    server.start()                        # in the hub: binds the socket (0600 in a 0700 dir)
    ...
    state = open_state(StateSettings(backend="host", socket=...), member="host:8443/w0")

Three kinds of connection from each worker, each a stream of :mod:`~gateway.state._wire`
frames: *requests* (bucket leases and returns, one at a time under a lock: a lease is rare,
see :mod:`~gateway.state._lease`), *subscriptions* (the hub pushes coordinated changes; the
worker answers each), and *usage* (batches of rows for the hub's monitor; no reply). An
``apply_everywhere`` opens a connection of its own, so a slow change never holds up quotas.

This module is the workers' side; the hub's is :mod:`._hub`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import StateUnavailable
from gateway.state._lease import LeasedBuckets
from gateway.state._local import _apply
from gateway.state._types import Applied, Handler
from gateway.state._usage import BatchingSink, Usage
from gateway.state._wire import WireError, recv, send

log = logging.getLogger("gateway.state")

#: Longest wait between reconnection attempts of a worker's subscription, seconds.
_MAX_BACKOFF = 1.0


class _Conn:
    """One request connection to the hub, used by one thread at a time; reconnects itself."""

    def __init__(self, path: Path, member: str, timeout: float, role: str) -> None:
        self.path = path
        self.member = member
        self.timeout = timeout
        self.role = role
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
            send(sock, {"op": "hello", "member": self.member, "role": self.role})
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, header: dict[str, Any], blobs: Sequence[bytes | memoryview] = (), *,
                reply: bool = True) -> dict[str, Any]:
        """Send ``header``; its answer (``{}`` when none is expected). StateUnavailable when the
        hub cannot be reached; a connection broken since its last use is retried once."""
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    send(self._sock, header, blobs)
                    return recv(self._sock)[0] if reply else {}
                except (OSError, WireError) as err:
                    self._close()
                    if fresh or attempt:
                        raise StateUnavailable(
                            f"the host's state hub ({self.path}) is unreachable: {err}; "
                            f"quotas cannot be checked, so the call is refused") from None
            raise AssertionError("unreachable")

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


class HostBucketStore:
    """The hub's buckets, as :class:`~gateway.state._lease.BucketStore`."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn

    def lease(self, key: str, rate: float, burst: int, need: int,
              want: int) -> tuple[int, float]:
        r = self._conn.request({"op": "lease", "k": key, "r": rate, "b": burst, "n": need,
                                "w": want})
        return int(r["g"]), float(r["l"])

    def release(self, key: str, rate: float, burst: int, n: int) -> None:
        self._conn.request({"op": "release", "k": key, "r": rate, "b": burst, "n": n},
                           reply=False)


def host_buckets(path: Path, member: str, *, timeout: float, lease_tokens: int,
                 lease_seconds: float) -> LeasedBuckets:
    return LeasedBuckets(HostBucketStore(_Conn(path, member, timeout, "buckets")),
                         lease_tokens=lease_tokens, lease_seconds=lease_seconds)


class HostCoordinator:
    """A worker's :class:`~gateway.state.Coordinator` through the hub.

    Pushed changes are applied one at a time, in the order the hub sent them, on one thread
    of this worker; handlers must be idempotent (a reconnection replays the desired state).
    """

    def __init__(self, path: Path, member: str, *, timeout: float) -> None:
        self.member = member
        self._path = path
        self._timeout = timeout
        self._handlers: dict[str, Handler] = {}
        self._replayed: dict[int, threading.Event] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._sock: socket.socket | None = None
        self._wlock = threading.Lock()
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    def subscribe(self, topic: str, handler: Handler) -> None:
        self._handlers[topic] = handler
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._read_loop, name="state-subscription",
                                 daemon=True),
                threading.Thread(target=self._apply_loop, name="state-apply", daemon=True)]
            for t in self._threads:
                t.start()
        if not self._connected.wait(self._timeout):
            raise StateUnavailable(f"the host's state hub ({self._path}) is unreachable: "
                                   f"cannot subscribe to {topic!r}")
        done = self._send_subscribe(topic)
        if done is None or not done.wait(self._timeout):
            raise StateUnavailable(f"the host's state hub ({self._path}) did not replay "
                                   f"{topic!r} within {self._timeout:g} s")

    def _send_subscribe(self, topic: str) -> threading.Event | None:
        sub_id = next(self._ids)
        done = self._replayed[sub_id] = threading.Event()
        try:
            with self._wlock:
                if self._sock is None:
                    return None
                send(self._sock, {"op": "subscribe", "id": sub_id, "topic": topic})
        except (OSError, WireError):
            return None
        return done

    def apply_everywhere(self, topic: str, key: str, payload: Mapping[str, object],
                         timeout: float) -> list[Applied]:
        conn = _Conn(self._path, self.member, timeout + self._timeout, "apply")
        try:
            r = conn.request({"op": "apply", "topic": topic, "key": key,
                              "payload": dict(payload), "timeout": timeout})
        finally:
            conn.close()
        return [Applied(str(m), bool(ok), str(d)) for m, ok, d in r["answers"]]

    def _read_loop(self) -> None:
        backoff = 0.05
        reconnected = False
        while not self._closed.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._path))
                send(sock, {"op": "hello", "member": self.member, "role": "subscriber"})
            except OSError:
                sock.close()
                self._closed.wait(backoff)
                backoff = min(_MAX_BACKOFF, backoff * 2)
                continue
            backoff = 0.05
            with self._wlock:
                self._sock = sock
            if reconnected:  # a new hub, or the same one back: converge again
                for topic in list(self._handlers):
                    self._send_subscribe(topic)
            reconnected = True  # the first time, subscribe() sends its own
            self._connected.set()
            try:
                while True:
                    h, _ = recv(sock)
                    if h.get("op") == "replay":
                        self._queue.put(("replay", h["topic"], h["items"], h["id"]))
                    elif h.get("op") == "apply":
                        self._queue.put(("apply", h["topic"], h["key"], h["payload"],
                                         h["id"]))
            except (OSError, WireError):
                pass
            finally:
                self._connected.clear()
                with self._wlock:
                    self._sock = None
                sock.close()

    def _apply_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if item[0] == "replay":
                _, topic, items, sub_id = item
                handler = self._handlers.get(topic)
                for key, payload in items:
                    if handler is not None:
                        error = _apply(handler, key, payload)
                        if error:
                            log.error("state: replaying %s %s failed: %s", topic, key, error)
                done = self._replayed.pop(sub_id, None)
                if done is not None:
                    done.set()
            else:
                _, topic, key, payload, push_id = item
                handler = self._handlers.get(topic)
                error = "not subscribed" if handler is None else _apply(handler, key, payload)
                with self._wlock:
                    if self._sock is not None:
                        with contextlib.suppress(OSError, WireError):
                            send(self._sock, {"op": "answer", "id": push_id,
                                              "ok": error is None, "detail": error or ""})

    def close(self) -> None:
        self._closed.set()
        self._queue.put(None)
        with self._wlock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)


class HostUsageSink(BatchingSink):
    """Hands a worker's background-scoring rows to the hub in batches (one frame per
    ``interval_s``), instead of scoring them on the worker's own thread."""

    target = "the hub"
    failures = (StateUnavailable,)

    def __init__(self, path: Path, member: str, *, timeout: float, max_backlog: int = 4096,
                 interval_s: float = 0.05) -> None:
        super().__init__(max_backlog=max_backlog, interval_s=interval_s,
                         thread_name="state-usage")
        self._conn = _Conn(path, member, timeout, "usage")

    def _send(self, batch: list[Usage]) -> None:
        header, blobs = encode_usage(batch)
        self._conn.request(header, blobs, reply=False)

    def close(self) -> None:
        super().close()
        self._conn.close()


def encode_usage(batch: Sequence[Usage]) -> tuple[dict[str, Any], list[bytes]]:
    """A usage frame: each distinct profile once, arrays as raw attachments."""
    blobs: list[bytes] = []
    profiles: dict[str, int] = {}
    items = []
    for u in batch:
        if u.profile_digest and u.profile_digest not in profiles:
            profiles[u.profile_digest] = len(blobs)
            blobs.append(u.profile)
        x = np.ascontiguousarray(u.x)
        blobs.append(x.tobytes())
        xi = len(blobs) - 1
        if u.y is not None:
            y = np.ascontiguousarray(u.y)
            blobs.append(y.tobytes())
            yi, ydt, yshape = len(blobs) - 1, y.dtype.str, list(y.shape)
        else:
            yi, ydt, yshape = -1, "", []
        items.append([u.model, u.caller, u.profile_digest, x.dtype.str, list(x.shape), xi,
                      ydt, yshape, yi])
    return {"op": "usage", "items": items, "profiles": profiles}, blobs
