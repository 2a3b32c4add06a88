"""A worker process's audit log: records handed to the hub's log over a Unix socket.

    log = RemoteAuditLog.connect(Path("var/run/audit.sock"), settings, instance_id="gw:8443/w0")
    receipt = log.append("decision", {...})   # durable in the host's one log when it returns

The worker does the least it can per call: the reserved-key test and one C call that turns
the caller's fields into their RFC 8785 bytes (orjson, sorted keys); the hub checks those
bytes with the verifier's rule, adds the reserved keys and hashes the leaf
(:mod:`gateway.audit._host`). Appends of concurrent calls are batched without a thread
hand-off: whichever appender finds nobody sending gathers, as the file log's committer
does, the records of the calls announced in flight (``announce``; at most
``group_commit_window_us``), sends them as one frame (and whatever queued meanwhile, as the
next), then waits for its own receipt like the others. One reply frame carries a frame's
receipts, all from one durable commit; the connection's reader thread wakes the frame's
appenders with one lock release each.

The payload digest stays here (the worker has the key file). Reads are forwarded to the hub.
If the hub goes away, every append waiting for a receipt and every new one raises
:class:`~gateway.errors.AuditUnavailable` and ``healthy`` is False; the reader thread
reconnects by itself, with exponential backoff, and ``healthy`` comes back with the hub. A
record is acknowledged (a receipt returned) only when the hub says it is durable.
"""

from __future__ import annotations

import collections
import functools
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.audit import _canonical, _frames, _keys
from gateway.audit._canonical import EncodingError
from gateway.audit._frames import FrameError
from gateway.audit._gather import Gathering
from gateway.audit._log import PayloadDigest, Receipt, checked_fields
from gateway.audit._merkle import ProofError
from gateway.errors import AuditDataError, AuditUnavailable

if TYPE_CHECKING:
    from gateway.audit import AuditSettings

log = logging.getLogger("gateway.audit.remote")

#: How long an append or a read waits for the hub's answer before failing closed.
ANSWER_SECONDS = 30.0
#: How long :meth:`RemoteAuditLog.connect` waits for the first connection (it never fails
#: for an absent hub: the client keeps trying, and ``healthy`` says whether it is there).
FIRST_CONNECT_SECONDS = 2.0
#: Reconnection backoff: first wait, longest wait (each failure doubles it, with jitter).
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 2.0
#: How long ``healthy``, ``size`` and ``checkpoint_age`` wait for the hub (a stuck hub must
#: not stall the health loop): no answer in time means unhealthy.
STATUS_SECONDS = 2.0
#: A hub health flag fresher than this (from any reply) answers ``healthy`` without asking.
HEALTH_FRESH_SECONDS = 0.2
#: Frame budget of one APPEND: records beyond it go in the next frame.
_FRAME_BUDGET = _frames.MAX_REQUEST - 64

try:
    import orjson
except ImportError:  # pragma: no cover - the standalone verifier's environment; never a worker
    orjson = None  # type: ignore[assignment]

# Sorted keys and 53-bit integers, as the hub's check demands; no conversion of datetimes,
# dataclasses or str/int/dict/list subclasses, which the file log's check refuses as well.
_encode_fields: Callable[[object], bytes] = _canonical.dumps if orjson is None else \
    functools.partial(orjson.dumps, option=orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
                      | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
                      | orjson.OPT_PASSTHROUGH_SUBCLASS)

_ERRORS: dict[int, type[AuditDataError] | type[AuditUnavailable]] = {
    _frames.DATA: AuditDataError, _frames.UNAVAILABLE: AuditUnavailable,
    _frames.PROOF: ProofError}


class _Waiter:
    """Parks threads on a held lock until :meth:`finish` (as the file log's ``_Batch``)."""

    __slots__ = ("_lock", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.error = ""

    def wait(self, timeout: float) -> bool:
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def finish(self) -> None:
        self._lock.release()

    def fail(self, reason: str) -> None:
        self.error = reason
        self._lock.release()


class _Outgoing(_Waiter):
    """The records of one APPEND frame, then their results."""

    __slots__ = ("items", "results", "size")

    def __init__(self) -> None:
        super().__init__()
        self.items: list[bytes] = []
        self.size = 0
        self.results: list[tuple[int, int, bytes | str]] = []


class _Call(_Waiter):
    """One forwarded read, then its result."""

    __slots__ = ("code", "items")

    def __init__(self) -> None:
        super().__init__()
        self.code = _frames.OK
        self.items: list[bytes] = []


class RemoteAuditLog:
    """The host's audit log as a worker process sees it (an ``AuditSink``)."""

    def __init__(self, socket_path: Path, instance_id: str, payload_key: bytes,
                 window_us: int = 0) -> None:
        self._path = str(socket_path)
        self._instance = instance_id
        self._payload_digest = PayloadDigest(payload_key)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()   # one frame on the wire at a time
        self._sock: socket.socket | None = None
        self._queue: collections.deque[_Outgoing] = collections.deque()
        self._sending = False
        # Calls announced that will append soon, and a sender waiting for them.
        self._gathering = Gathering(self._lock, window_us)
        self._inflight: dict[int, _Waiter] = {}
        self._request = 0
        self._on_commit: Callable[[float, int], None] | None = None
        self._reason = "not connected yet"
        self._hub_healthy = False
        self._heard = 0.0             # monotonic time of the last reply
        self._size = 0
        self._age = 0.0
        self._age_at = time.monotonic()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-remote", daemon=True)

    @classmethod
    def connect(cls, socket_path: Path, settings: AuditSettings, *,
                instance_id: str) -> RemoteAuditLog:
        """A client of the hub's log on ``socket_path``; its records carry ``instance_id``.

        Fails (like ``AuditLog.open``) when the payload key cannot be read; never for an
        absent hub: it waits up to ``FIRST_CONNECT_SECONDS`` for the first connection, then
        returns anyway, unhealthy, and keeps connecting in the background.
        """
        self = cls(socket_path, instance_id, _keys.load_hmac_key(settings.payload_key),
                   settings.group_commit_window_us)
        self._thread.start()
        self._connected.wait(FIRST_CONNECT_SECONDS)
        return self

    def wait_connected(self, timeout: float) -> bool:
        """Whether the client is connected to a hub, waiting up to ``timeout`` seconds."""
        return self._connected.wait(timeout)

    # -- appending ----------------------------------------------------------------------------

    def append(self, kind: str, fields: Mapping[str, object]) -> Receipt:
        """Hand a record to the hub; return its receipt once durable (AuditUnavailable if
        the hub cannot make it durable, is gone, or does not answer in time)."""
        fields = checked_fields(kind, fields)
        try:
            raw = _encode_fields(fields)
        except TypeError as err:  # orjson.JSONEncodeError
            raise EncodingError(f"{kind}: {err}") from None
        kind_bytes = kind.encode()
        if len(kind_bytes) > 255 or len(raw) > _frames.MAX_FIELDS:
            raise EncodingError(f"{kind}: record too large for the audit hub "
                                f"({len(raw)} bytes of fields)")
        rec = _frames.item(kind_bytes, raw)
        with self._lock:
            if self._sock is None:
                raise AuditUnavailable(f"audit log hub unreachable: {self._reason}")
            out = self._queue[-1] if self._queue else None
            if (out is None or out.size + len(rec) > _FRAME_BUDGET
                    or len(out.items) == _frames.MAX_RECORDS):
                out = _Outgoing()
                self._queue.append(out)
            slot = len(out.items)
            out.items.append(rec)
            out.size += len(rec)
            self._gathering.arrive()
            lead = not self._sending
            if lead:
                self._sending = True
        if lead:
            self._send_queued()
        if not out.wait(ANSWER_SECONDS):
            raise AuditUnavailable(f"the audit log hub did not answer within "
                                   f"{ANSWER_SECONDS:.0f} s")
        if out.error:
            raise AuditUnavailable(out.error)
        code, index, value = out.results[slot]
        if code == _frames.OK and isinstance(value, bytes):
            return Receipt(index, value)
        if code == _frames.DATA:
            raise EncodingError(str(value))
        raise AuditUnavailable(str(value))

    def _send_queued(self) -> None:
        """Send the queued frame (after gathering announced calls' records into it), then
        whatever queued meanwhile (at once: each further frame is one quick write, while
        the caller's own record is already on its way); then step down."""
        gather = True
        while True:
            with self._lock:
                if gather:
                    self._gather()
                    gather = False
                if not self._queue:
                    self._sending = False
                    return
                out = self._queue.popleft()
                sock = self._sock
                if sock is None:
                    out.fail(f"audit log hub unreachable: {self._reason}")
                    continue
                request = self._request = (self._request + 1) & 0xFFFFFFFF
                self._inflight[request] = out
            self._send(sock, _frames.append(request, out.items))

    def _send(self, sock: socket.socket, data: bytes) -> None:
        """Put one frame on the wire; on failure drop the connection (the reader thread then
        fails everything in flight and reconnects)."""
        try:
            with self._send_lock:
                sock.sendall(data)
        except OSError as err:
            self._reason = f"sending to the audit log hub failed: {err}"
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def announce(self) -> None:
        """A call has started that will append a record soon: the appender about to send a
        frame waits (at most ``group_commit_window_us``) until every announced call has queued
        its record, so that under load one frame, one reply and one commit carry many
        records. The file log gathers its commits the same way."""
        with self._lock:
            self._gathering.announce()

    def _gather(self) -> None:
        """With the lock held: wait briefly for announced calls' records to join the frame."""
        self._gathering.wait(lambda: self._sock is not None)

    def payload_digest(self, *chunks: bytes) -> str:
        """Keyed HMAC-SHA256 of the request payload (computed here, with the worker's key)."""
        return self._payload_digest(chunks)

    def observe_commits(self, callback: Callable[[float, int], None]) -> None:
        """Call ``callback(seconds, records)`` for each reply: the hub's commit time and how
        many of this worker's records it carried (called on the reader thread)."""
        self._on_commit = callback

    # -- reads (forwarded) --------------------------------------------------------------------

    def _call(self, method: int, a: int = 0, b: int = 0,
              timeout: float = ANSWER_SECONDS) -> list[bytes]:
        call = _Call()
        with self._lock:
            sock = self._sock
            if sock is None:
                raise AuditUnavailable(f"audit log hub unreachable: {self._reason}")
            request = self._request = (self._request + 1) & 0xFFFFFFFF
            self._inflight[request] = call
        self._send(sock, _frames.call(request, method, a, b))
        if not call.wait(timeout):
            with self._lock:
                self._inflight.pop(request, None)
            raise AuditUnavailable(f"the audit log hub did not answer within {timeout:.0f} s")
        if call.error:
            raise AuditUnavailable(call.error)
        if call.code != _frames.OK:
            message = call.items[0].decode(errors="replace") if call.items else "failed"
            raise _ERRORS.get(call.code, AuditUnavailable)(message)
        return call.items

    def _note(self, method: int, a: int = 0) -> str | None:
        items = self._call(method, a)
        return items[0].decode() if items else None

    def checkpoint(self) -> str | None:
        return self._note(_frames.CHECKPOINT)

    def fresh_checkpoint(self) -> str | None:
        return self._note(_frames.FRESH_CHECKPOINT)

    def checkpoint_note(self, size: int) -> str | None:
        return self._note(_frames.CHECKPOINT_NOTE, size)

    def entries(self, start: int, end: int) -> list[bytes]:
        """Records ``[start, end)`` (clamped to the durable size), fetched in pages."""
        out: list[bytes] = []
        step = _frames.MAX_ENTRIES
        while start < end:
            page = self._call(_frames.ENTRIES, start, min(end, start + step))
            out += page
            if len(page) < min(end - start, step):
                break  # the log ends here
            start += len(page)
        return out

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self._call(_frames.INCLUSION_PROOF, index, size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return self._call(_frames.CONSISTENCY_PROOF, first, second)

    def root(self, size: int) -> bytes:
        (root,) = self._call(_frames.ROOT, size)
        return root

    def _status(self) -> None:
        raw = self._call(_frames.STATUS, timeout=STATUS_SECONDS)[0]
        size, age = _frames.parse_status(raw)
        self._size, self._age, self._age_at = size, age, time.monotonic()

    @property
    def size(self) -> int:
        """Records durable in the host's log (the last known figure while the hub is away)."""
        try:
            self._status()
        except AuditUnavailable:
            pass
        return self._size

    @property
    def checkpoint_age(self) -> float:
        """Seconds since the hub's last checkpoint (while the hub is away: the last known age
        plus the time since, so an alert on it fires)."""
        try:
            self._status()
        except AuditUnavailable:
            pass
        return self._age + time.monotonic() - self._age_at

    @property
    def healthy(self) -> bool:
        """Connected to a hub whose log can make records durable now (asked when the last
        word from the hub is older than ``HEALTH_FRESH_SECONDS``)."""
        if self._sock is None:
            return False
        if time.monotonic() - self._heard > HEALTH_FRESH_SECONDS:
            try:
                self._status()
            except AuditUnavailable:
                return False
        return self._sock is not None and self._hub_healthy

    # -- the connection (reader thread) -------------------------------------------------------

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        down_logged = False
        while not self._stop.is_set():
            try:
                sock, reader = self._open()
            except (OSError, FrameError) as err:
                self._reason = f"cannot connect to {self._path}: {err}"
                if not down_logged:
                    log.error("audit log hub unreachable (%s); appends fail closed, "
                              "retrying", self._reason)
                    down_logged = True
                self._stop.wait(delay * random.uniform(0.5, 1.0))  # jitter
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            with self._lock:
                self._sock = sock
                self._hub_healthy = True
                self._heard = time.monotonic()
            self._connected.set()
            if down_logged:
                log.info("audit log hub reachable again on %s", self._path)
            down_logged = False
            delay = BACKOFF_FIRST
            reason = self._serve(sock, reader)
            self._lost(sock, reason)
            if not self._stop.is_set():
                log.error("audit log hub connection lost (%s); appends fail closed, "
                          "reconnecting", reason)
                down_logged = True

    def _open(self) -> tuple[socket.socket, _frames.FrameReader]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(ANSWER_SECONDS)
            sock.connect(self._path)
            sock.sendall(_frames.hello(self._instance))
            reader = _frames.FrameReader(sock, _frames.MAX_REPLY)
            got = reader.read()
            if got is None:
                raise FrameError("the hub closed the connection before answering HELLO")
            if got[0] != _frames.WELCOME:
                raise FrameError(f"the hub answered HELLO with frame type {got[0]}"
                                 + (f": {got[1].decode(errors='replace')}"
                                    if got[0] == _frames.ERROR else ""))
            _frames.check_welcome(got[1])
        except BaseException:
            sock.close()
            raise
        return sock, reader

    def _serve(self, sock: socket.socket, reader: _frames.FrameReader) -> str:
        """Take the hub's replies until the connection ends; return why it ended."""
        while True:
            try:
                got = reader.read()
            except TimeoutError:
                continue  # idle; the partial frame, if any, is kept
            except (OSError, FrameError) as err:
                return self._reason if self._stop.is_set() else str(err)
            if got is None:
                return "the hub closed the connection"
            kind, body = got
            try:
                if kind == _frames.APPENDED:
                    self._appended(body)
                elif kind == _frames.RESULT:
                    self._result(body)
                elif kind == _frames.ERROR:
                    return f"the hub refused this connection: {body.decode(errors='replace')}"
                else:
                    raise FrameError(f"unexpected frame type {kind} from the hub")
            except FrameError as err:
                return str(err)

    def _appended(self, body: bytes) -> None:
        request, healthy, seconds, results = _frames.parse_appended(body)
        with self._lock:
            out = self._inflight.pop(request, None)
            self._hub_healthy, self._heard = healthy, time.monotonic()
        if out is None:
            return  # answered after its appenders gave up waiting
        if not isinstance(out, _Outgoing) or len(results) != len(out.items):
            out.fail("the audit log hub's answer does not match the request")
            raise FrameError(f"the hub answered request {request}, which is not an append "
                             "in flight (or with the wrong number of results)")
        out.results = results
        callback = self._on_commit
        if callback is not None:  # before the appenders wake: their metrics are in by then
            durable = sum(1 for r in results if r[0] == _frames.OK)
            if durable:
                try:
                    callback(seconds, durable)
                except Exception:
                    log.exception("audit commit observer failed")
        out.finish()

    def _result(self, body: bytes) -> None:
        request, healthy, code, items = _frames.parse_result(body)
        with self._lock:
            call = self._inflight.pop(request, None)
            self._hub_healthy, self._heard = healthy, time.monotonic()
        if call is None:
            return  # answered after the reader gave up waiting
        if not isinstance(call, _Call):
            call.fail("the audit log hub's answer does not match the request")
            raise FrameError(f"the hub answered request {request}, which is not a read "
                             "in flight")
        call.code, call.items = code, items
        call.finish()

    def _lost(self, sock: socket.socket, reason: str) -> None:
        """Fail everything waiting on this connection (closed: never acknowledged)."""
        self._connected.clear()
        with self._lock:
            if self._sock is sock:
                self._sock = None
            self._reason = reason
            waiting = [*self._inflight.values(), *self._queue]
            self._inflight.clear()
            self._queue.clear()
            self._gathering.interrupt()  # a sender gathering records: nothing more will come
        for w in waiting:
            w.fail(f"audit log hub connection lost: {reason}")
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._send_lock:  # no sendall is using the descriptor when it closes
            sock.close()

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait (briefly) for appends in flight to get their receipts, then disconnect. The
        hub keeps the log open: its own stop signs the final checkpoint."""
        deadline = time.monotonic() + ANSWER_SECONDS
        while True:
            with self._lock:
                pending = [*self._inflight.values(), *self._queue]
                sock = self._sock
            if not pending or sock is None or time.monotonic() > deadline:
                break
            pending[0].wait(max(deadline - time.monotonic(), 0))
        self._reason = "closed"
        self._stop.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> RemoteAuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



if TYPE_CHECKING:
    from gateway.audit._log import AuditLog
    from gateway.audit._sink import AuditSink

    def _satisfies_the_sink(remote: RemoteAuditLog, local: AuditLog) -> list[AuditSink]:
        """mypy checks here that both backends keep the serving layer's protocol."""
        return [remote, local]
