"""One audit log per host: the hub process serves its file log to the worker processes.

    server = LogServer(settings, Path("var/run/audit.sock"), instance_id="gw.local:8443/hub")
    server.start()                      # opens the AuditLog, then serves it
    server.log.append("anomaly", {...}) # the hub's own records, in the same index space
    server.stop()                       # answers what is pending, then the final checkpoint

Workers hand records over with :class:`~gateway.audit.RemoteAuditLog`. The hub's one
:class:`~gateway.audit.AuditLog` does all the sequencing, so there is one index space, one
chain, one tree and one checkpoint signer for the host. A worker sends each record's fields as
their RFC 8785 bytes; the hub checks them with the verifier's own rule
(``_canonical.decode_canonical``: what the hub accepts, ``gateway audit verify`` accepts), adds
the reserved keys (sequence, time, kind, instance, chain) and hashes the leaf. Every record of
one APPEND frame goes to disk in one commit, and the reply carrying their receipts is sent
only once that commit is durable.

A connection whose peer is not this user, or that sends a malformed or oversized frame, is
closed; the others are not affected. The socket is created mode 0600 in a 0700 directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from gateway._atomic import private_dir
from gateway.audit import _canonical, _frames
from gateway.audit._frames import FrameError
from gateway.audit._log import RESERVED, AuditLog
from gateway.audit._merkle import ProofError
from gateway.errors import AuditDataError, AuditUnavailable

if TYPE_CHECKING:
    from gateway.audit import AuditSettings
    from gateway.audit._log import _Batch

log = logging.getLogger("gateway.audit.host")

#: A peer must name itself (HELLO) this soon after connecting.
HANDSHAKE_SECONDS = 5.0
#: A worker that does not take its replies for this long is disconnected.
SEND_SECONDS = 30.0

_PEERCRED = struct.Struct("3i")  # pid, uid, gid (Linux struct ucred)
_END = object()


class LogServer:
    """Owns the host's file :class:`AuditLog` and serves it on a Unix socket to the workers."""

    def __init__(self, settings: AuditSettings, socket_path: Path, *, instance_id: str) -> None:
        self._settings = settings
        self._path = Path(socket_path)
        self._instance = instance_id
        self._log: AuditLog | None = None
        self._listener: socket.socket | None = None
        self._inode = 0
        self._lock_fd = -1
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="audit-hub-accept",
                                          daemon=True)

    @property
    def log(self) -> AuditLog:
        """The log itself, for the hub's own records (they share the workers' index space)."""
        if self._log is None:
            raise AuditUnavailable("the audit log server has not been started")
        return self._log

    @property
    def socket_path(self) -> Path:
        return self._path

    def start(self) -> None:
        """Open the log (failing as :meth:`AuditLog.open` does), bind the socket, serve."""
        self._check_directory()
        self._take_lock()
        try:
            self._log = AuditLog.open(self._settings, instance_id=self._instance)
        except BaseException:
            self._release_lock()
            raise
        try:
            self._listener = self._bind()
        except OSError as err:
            self._log.close()
            self._release_lock()
            raise AuditUnavailable(f"cannot serve the audit log on {self._path}: {err}") from None
        self._acceptor.start()
        log.info("audit log %s served on %s", self._settings.directory, self._path)

    def _check_directory(self) -> None:
        directory = self._path.parent
        private_dir(directory)
        st = directory.stat()
        if st.st_mode & 0o077 or st.st_uid != os.getuid():
            raise AuditUnavailable(
                f"the audit socket's directory {directory} must be owned by this user and "
                f"mode 0700 (it is {stat.filemode(st.st_mode)}, uid {st.st_uid}): another "
                "user could reach the socket; fix it with chmod 700")

    def _take_lock(self) -> None:
        """One hub per socket: a second one (two writers of one log would fork it) is refused
        while the first holds the lock file beside the socket. The kernel releases it when
        its holder dies, so a killed hub's successor starts at once."""
        path = self._path.with_name(self._path.name + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AuditUnavailable(f"another audit log server is serving on {self._path} "
                                   f"(it holds {path})") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _bind(self) -> socket.socket:
        """Bind under a temporary name, make it 0600, then rename it into place (atomic, so a
        worker never finds a socket with a looser mode, or none while a stale one is replaced)."""
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(128)
            os.replace(tmp, self._path)
            self._inode = self._path.stat().st_ino
        except OSError:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise
        return sock

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError as err:
                if self._stopping.is_set():
                    return
                log.error("audit socket accept failed: %s", err)
                self._stopping.wait(0.1)  # e.g. out of file descriptors: not a busy loop
                continue
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            if uid != os.getuid():
                log.warning("audit socket: refused a connection from uid %d (pid %d)", uid, pid)
                sock.close()
                continue
            conn = _Connection(self, sock, pid)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._connections.add(conn)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def stop(self) -> None:
        """Stop serving, answer every record already handed over (once durable), then close
        the log (its ``log_close`` record and final signed checkpoint)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
            try:
                if self._path.stat().st_ino == self._inode:
                    self._path.unlink()
            except OSError:
                pass
        if self._acceptor.is_alive():
            self._acceptor.join()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.stop_reading()
        for conn in connections:
            conn.join()
        if self._log is not None:
            self._log.close()
        self._release_lock()


class _Reply:
    """An APPEND's answer: per record a failure found on arrival, or a place in the batch."""

    __slots__ = ("first", "leaves", "plan", "request")

    def __init__(self, request: int, plan: list[bytes | None]) -> None:
        self.request = request
        self.plan = plan          # per record: None (submitted) or its failure, encoded
        self.first = 0
        self.leaves: list[bytes] = []

    def frame(self, healthy: bool, error: str = "", seconds: float = 0.0) -> bytes:
        out: list[bytes] = []
        index = self.first
        leaves = iter(self.leaves)
        for planned in self.plan:
            if planned is not None:
                out.append(planned)
            elif error:
                out.append(_frames.failed(_frames.UNAVAILABLE, error))
            else:
                out.append(_frames.receipt(index, next(leaves)))
                index += 1
        return _frames.appended(self.request, healthy and not error, seconds, out)


class _Connection:
    """One worker. Its reader thread takes the frames: records go to the log at once (so the
    next frame is read while the commit is on disk), reads are answered in place. The thread
    that made a commit durable sends its APPENDED replies without blocking (no thread
    hand-off per frame); only what a full socket buffer leaves over goes to the connection's
    replier thread."""

    def __init__(self, server: LogServer, sock: socket.socket, pid: int) -> None:
        self._server = server
        self._log = server.log
        self._sock = sock
        self._name = f"pid {pid}"
        self.instance = ""
        self._send_lock = threading.Lock()   # one frame on the wire at a time
        self._outstanding = 0                # APPENDs submitted, not yet answered
        self._idle = threading.Condition()
        self._leftovers: queue.SimpleQueue[tuple[bytes, bool] | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="audit-hub-read", daemon=True)
        self._replier = threading.Thread(target=self._reply, name="audit-hub-reply",
                                         daemon=True)

    def start(self) -> None:
        sec = int(SEND_SECONDS)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, 0))
        self._reader.start()
        self._replier.start()

    def stop_reading(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def join(self) -> None:
        self._reader.join()
        self._replier.join()

    # -- the reader thread ------------------------------------------------------------------

    def _read(self) -> None:
        reader = _frames.FrameReader(self._sock, _frames.MAX_REQUEST)
        try:
            self._sock.settimeout(HANDSHAKE_SECONDS)
            first = reader.read()
            if first is None:
                return
            if first[0] != _frames.HELLO:
                raise FrameError("the first frame must be HELLO")
            self.instance = _frames.parse_hello(first[1])
            self._name = f"{self.instance} ({self._name})"
            self._sock.settimeout(None)
            self._send(_frames.welcome())
            while True:
                got = reader.read()
                if got is None:
                    return
                kind, body = got
                if kind == _frames.APPEND:
                    self._append(body)
                elif kind == _frames.CALL:
                    self._call(body)
                else:
                    raise FrameError(f"unexpected frame type {kind}")
        except FrameError as err:
            log.warning("audit socket: closing the connection of %s: %s", self._name, err)
            self._send(_frames.error(str(err)))
        except TimeoutError:
            log.warning("audit socket: %s did not say HELLO in time", self._name)
        except OSError as err:
            if not self._server._stopping.is_set():
                log.info("audit socket: connection of %s ended: %s", self._name, err)
        except Exception:  # a bug must close this connection, never leave it hanging
            log.exception("audit socket: closing the connection of %s", self._name)
        finally:
            with self._idle:  # every commit still ends; answer what can be answered
                self._idle.wait_for(lambda: self._outstanding == 0)
            self._leftovers.put(None)

    def _append(self, body: bytes) -> None:
        request, items = _frames.parse_append(body)
        plan: list[bytes | None] = []
        records: list[tuple[str, dict[str, object]]] = []
        for raw_kind, raw_fields in items:
            try:
                kind = raw_kind.decode()
                if not kind:
                    raise AuditDataError("audit record kind must be a non-empty string")
                fields = _canonical.decode_canonical(raw_fields)
                if not RESERVED.isdisjoint(fields):
                    raise AuditDataError(f"audit fields may not use the reserved keys "
                                         f"{sorted(RESERVED.intersection(fields))}")
            except (AuditDataError, UnicodeDecodeError) as err:
                plan.append(_frames.failed(_frames.DATA, f"{raw_kind[:64]!r}: {err}"))
                continue
            plan.append(None)
            records.append((kind, fields))
        reply = _Reply(request, plan)
        if not records:
            self._send(reply.frame(self._log.healthy))
            return

        def committed(first: int, leaves: list[bytes], batch: _Batch) -> None:
            reply.first, reply.leaves = first, leaves
            error = "" if batch.error is None else \
                f"audit record could not be made durable: {batch.error}"
            self._deliver(reply.frame(self._log.healthy, error, batch.seconds))

        with self._idle:
            self._outstanding += 1
        try:
            self._log.submit(records, self.instance, committed)
        except Exception as err:  # the log refused them all: none is queued, answer now
            if not isinstance(err, AuditUnavailable):
                log.exception("audit socket: records of %s not taken", self._name)
            self._send(reply.frame(False, str(err) or "internal error in the audit hub"))
            self._answered()

    def _call(self, body: bytes) -> None:
        request, method, a, b = _frames.parse_call(body)
        if not _frames.CHECKPOINT <= method <= _frames.STATUS:
            raise FrameError(f"unknown CALL method {method}")
        try:
            items = self._answer(method, a, b)
            code = _frames.OK
        except ProofError as err:
            code, items = _frames.PROOF, [str(err).encode()]
        except (AuditDataError, ValueError, IndexError) as err:
            code, items = _frames.DATA, [str(err).encode()]
        except (AuditUnavailable, OSError) as err:
            code, items = _frames.UNAVAILABLE, [str(err).encode()]
        except Exception:
            log.exception("audit socket: read %d for %s failed", method, self._name)
            code, items = _frames.UNAVAILABLE, [b"internal error in the audit hub"]
        self._send(_frames.result(request, self._log.healthy, code, items))

    def _answer(self, method: int, a: int, b: int) -> list[bytes]:
        lg = self._log
        if method in (_frames.CHECKPOINT, _frames.FRESH_CHECKPOINT, _frames.CHECKPOINT_NOTE):
            note = (lg.checkpoint() if method == _frames.CHECKPOINT
                    else lg.fresh_checkpoint() if method == _frames.FRESH_CHECKPOINT
                    else lg.checkpoint_note(a))
            return [] if note is None else [note.encode()]
        if method == _frames.ENTRIES:
            if not 0 <= a <= b or b - a > _frames.MAX_ENTRIES:
                raise AuditDataError(f"entries [{a}, {b}): ask for at most "
                                     f"{_frames.MAX_ENTRIES} records from a non-negative start")
            return lg.entries(a, b)
        if method == _frames.INCLUSION_PROOF:
            return lg.inclusion_proof(a, b)
        if method == _frames.CONSISTENCY_PROOF:
            return lg.consistency_proof(a, b)
        if method == _frames.ROOT:
            return [lg.root(a)]
        return [_frames.status(lg.size, lg.checkpoint_age)]

    # -- sending ----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Send from the reader thread (blocking, bounded by SO_SNDTIMEO)."""
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as err:
                self._drop(err)

    def _deliver(self, data: bytes) -> None:
        """Send from the committing thread: never block it. If the socket is busy or full,
        the replier thread sends (the rest of) the frame."""
        try:
            if self._send_lock.acquire(blocking=False):
                try:
                    sent = self._sock.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as err:
                    self._send_lock.release()
                    self._drop(err)
                    return
                if sent == len(data):
                    self._send_lock.release()
                else:  # the replier sends the rest, then releases the lock
                    self._leftovers.put((data[sent:], True))
            else:
                self._leftovers.put((data, False))
        finally:
            self._answered()

    def _answered(self) -> None:
        with self._idle:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()

    def _drop(self, err: OSError) -> None:
        if not self._server._stopping.is_set():
            log.warning("audit socket: cannot answer %s (%s); disconnecting it", self._name, err)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader ends too
        except OSError:
            pass

    def _reply(self) -> None:
        """The replier thread: what the committing thread could not send at once."""
        try:
            while True:
                item = self._leftovers.get()
                if item is None:
                    return
                data, locked = item
                if not locked:
                    self._send_lock.acquire()
                try:
                    self._sock.sendall(data)
                except OSError as err:
                    self._drop(err)
                finally:
                    self._send_lock.release()
        finally:
            self._reader.join()
            self._sock.close()
            self._server._forget(self)
