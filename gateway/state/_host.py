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

Only processes of the hub's own user may connect (checked with ``SO_PEERCRED`` as well as by
the socket's mode). The hub keeps the buckets and the desired state in memory: when it
restarts, buckets start full and (unless it was given a ``state_file``) the desired state
starts empty, while each worker keeps what it applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gateway._atomic import private_dir, write_atomic
from gateway.errors import StateUnavailable
from gateway.state._lease import LeasedBuckets
from gateway.state._local import LocalBuckets, _apply
from gateway.state._types import Applied, Handler
from gateway.state._usage import Usage, UsageHandler
from gateway.state._wire import WireError, recv, send

log = logging.getLogger("gateway.state")

_PEERCRED = struct.Struct("3i")
#: Array kinds accepted in usage batches: numbers only (never object arrays).
_NUMERIC = frozenset("biuf")
#: Profiles the hub keeps parsed-ready by digest.
_PROFILES = 256
#: Longest wait between reconnection attempts of a worker's subscription, seconds.
_MAX_BACKOFF = 1.0


# --------------------------------------------------------------------------- the hub


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
        for digest, index in h.get("profiles", {}).items():
            if len(self._profiles) >= _PROFILES:
                self._profiles.clear()
            self._profiles[str(digest)] = bytes(blobs[int(index)])
        batch = []
        for model, caller, digest, xdt, xshape, xi, ydt, yshape, yi in h["items"]:
            batch.append(Usage(str(model), str(caller), _array(blobs[xi], xdt, xshape),
                               None if yi < 0 else _array(blobs[yi], ydt, yshape),
                               self._profiles.get(digest, b"") if digest else b"",
                               str(digest or "")))
        try:
            self.on_usage(member, batch)
        except Exception:  # scoring must not take the hub's connection down
            log.exception("state hub: usage handler failed")


def _array(blob: memoryview, dtype: str, shape: Sequence[int]) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind not in _NUMERIC:
        raise ValueError(f"usage array of dtype {dtype} refused")
    return np.frombuffer(blob, dtype=dt).reshape(tuple(int(s) for s in shape))


# --------------------------------------------------------------------------- workers


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


class HostUsageSink:
    """Hands a worker's background-scoring rows to the hub in batches (one frame per
    ``interval_s``), instead of scoring them on the worker's own thread."""

    def __init__(self, path: Path, member: str, *, timeout: float, max_backlog: int = 4096,
                 interval_s: float = 0.05) -> None:
        self._conn = _Conn(path, member, timeout, "usage")
        self._max = max_backlog
        self._interval = interval_s
        self._lock = threading.Lock()
        self._queue: list[Usage] = []
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        #: Requests dropped: queue full, or the hub unreachable when their batch was sent.
        self.dropped = 0
        self._failing = False
        self._on_dropped: Callable[[int], None] = lambda n: None

    def submit(self, usage: Usage) -> bool:
        with self._lock:
            if len(self._queue) >= self._max:
                self.dropped += 1
                self._on_dropped(1)
                return False
            self._queue.append(usage)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="state-usage",
                                                daemon=True)
                self._thread.start()
        return True

    def on_dropped(self, callback: Callable[[int], None]) -> None:
        self._on_dropped = callback

    def _run(self) -> None:
        while not self._closed.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        if not batch:
            return
        header, blobs = encode_usage(batch)
        try:
            self._conn.request(header, blobs, reply=False)
        except StateUnavailable as err:
            self.dropped += len(batch)
            self._on_dropped(len(batch))
            if not self._failing:  # once per outage, not once per batch
                log.warning("state: usage not handed to the hub, so not scored, until it is "
                            "back (%d request(s) so far): %s", len(batch), err)
            self._failing = True
        else:
            if self._failing:
                log.warning("state: usage reaches the hub again (%d request(s) went unscored)",
                            self.dropped)
            self._failing = False

    def close(self) -> None:
        self._closed.set()
        self.flush()
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


def profile_digest(profile: bytes) -> str:
    return hashlib.sha256(profile).hexdigest()
