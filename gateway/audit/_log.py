"""The audit log writer: canonical records, hash chain, Merkle tree, group commit, checkpoints."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway._atomic import write_atomic
from gateway.audit import _canonical, _keys, _tags
from gateway.audit._gather import Gathering
from gateway.audit._merkle import Tree, leaf_hash
from gateway.audit._note import Checkpoint, parse_vkey
from gateway.audit._recovery import AuditLogDamaged as AuditLogDamaged  # re-exported
from gateway.audit._recovery import Recovery, chain_head
from gateway.audit._store import FileStore, Store, StoreDamaged, read_checkpoints
from gateway.audit._tags import CommitTag
from gateway.audit._verify import GENESIS_PREV, SCHEMA_VERSION
from gateway.errors import AuditUnavailable

if TYPE_CHECKING:
    from gateway.audit import AuditSettings
    from gateway.audit._note import Signer

log = logging.getLogger("gateway.audit")

#: Keys the log writes itself; a caller's fields may not use them.
RESERVED = frozenset({"v", "seq", "time_ms", "kind", "instance", "prev"})
_sha256 = hashlib.sha256
# Who is committing: an appending caller (the log was idle) or the writer thread (under load).
_CALLER, _WRITER = "caller", "writer"


@dataclass(frozen=True)
class Receipt:
    """Where a record landed: its index in the log and its RFC 6962 leaf hash."""

    index: int
    leaf_hash: bytes


def checked_fields(kind: str, fields: Mapping[str, object]) -> dict[str, object]:
    """The caller's fields as a dict, once its ``kind`` is a non-empty string and no field uses
    a key the log writes itself: the first step of every backend's ``append``.

    :raises ValueError: a reserved key or a bad kind (a programming error, not the caller's).
    """
    if type(fields) is not dict:
        fields = dict(fields)
    if not RESERVED.isdisjoint(fields):
        raise ValueError(f"audit fields may not use the reserved keys "
                         f"{sorted(RESERVED.intersection(fields))}")
    if type(kind) is not str or not kind:
        raise ValueError("audit record kind must be a non-empty string")
    return fields


class PayloadDigest:
    """Keyed HMAC-SHA256 of a request's payload bytes, hex: every audit backend's digest.

    Keyed once; each digest starts from a copy, which skips the key schedule per call.
    """

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=_sha256)

    def __call__(self, chunks: Iterable[bytes]) -> str:
        mac = self._mac.copy()
        for c in chunks:
            mac.update(c)
        return mac.hexdigest()


class _Batch:
    """Records committed together; waiters block in :meth:`wait` until the commit is done.

    A bare lock, held from creation until the commit ends, is the cheapest way to park many
    threads in CPython: each waiter acquires and at once releases it, so waking is a chain of
    C-level lock hand-offs instead of a Python ``Condition.notify_all`` loop.
    """

    __slots__ = ("_lock", "error", "records", "seconds", "then")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.error: BaseException | None = None
        #: The commit that carried this batch: its records and how long it took (for a
        #: remote appender's ``observe_commits``); set before the batch finishes.
        self.records = 0
        self.seconds = 0.0
        #: Called by the committing thread once the batch has finished (see ``submit``).
        self.then: list[Callable[[_Batch], None]] = []

    def wait(self) -> None:
        self._lock.acquire()
        self._lock.release()

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._lock.release()
        for callback in self.then:
            try:
                callback(self)
            except Exception:  # a callback must not take the writer thread down
                log.exception("audit commit callback failed")


class AuditLog:
    """An append-only, tamper-evident log of gateway decisions.

        log = AuditLog.open(settings, instance_id="gw-1")
        receipt = log.append("decision", {"rpc": "ModelInfer", "decision": "allow", ...})
        log.close()

    ``append`` returns only once the record is on disk. Group commit: when the log is idle the
    appending thread writes its record itself (no thread hand-off); records that arrive while a
    commit is on disk queue up, and the writer thread commits all of them with the next single
    write. The writer thread also publishes the signed checkpoints.
    """

    def __init__(self, settings: AuditSettings, store: Store, signer: Signer,
                 payload_key: bytes, instance_id: str, tag_key: bytes) -> None:
        self._settings = settings
        self._store = store
        self._signer = signer
        self._origin = signer.name
        self._vkey = parse_vkey(signer.vkey)
        self._payload_digest = PayloadDigest(payload_key)
        self._tag_key = tag_key
        self._tag_serial = 0         # serial of the last commit tag written
        self._witness = settings.witness_path()
        self._instance = instance_id
        self._tree = Tree()
        self._tree_lock = threading.Lock()
        # Serialises signing: checkpoints are published in size order, never two at once.
        self._cp_lock = threading.Lock()
        self._lock = threading.Lock()
        # The writer thread waits on _wake (work, the checkpoint timer, close); a committer
        # gathering announced records waits in _gathering, so an arriving record wakes only it.
        self._wake = threading.Condition(self._lock)
        self._pending: list[bytes] = []
        self._pending_hashes: list[bytes] = []
        self._batch = _Batch()
        self._size = 0               # next index to assign (includes pending records)
        self._prev = GENESIS_PREV    # hex leaf hash of the last assigned record
        self._durable = 0
        self._durable_prev = GENESIS_PREV
        self._healthy = True
        self._committer: str | None = None   # who commits now: None, _CALLER or _WRITER
        # Calls announced by the server that will append soon (see announce): under load,
        # one commit then carries many records.
        self._gathering = Gathering(self._lock, settings.group_commit_window_us)
        self._on_commit: Callable[[float, int], None] | None = None
        self._closing = False
        self._closed = False
        self._cp_size = -1
        self._cp_note: str | None = None
        self._cp_time = time.monotonic()
        # When the oldest record no checkpoint covers became durable: the next checkpoint is
        # due checkpoint_ms later (earlier if this is stale: early is harmless, late is not).
        self._unsigned_since = time.monotonic()
        # Why the last checkpoint (log files or witness copy) could not be published: until
        # one is, the log accepts no record (fail closed) and says it is unhealthy.
        self._publish_error: OSError | None = None
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: AuditSettings, *, instance_id: str) -> AuditLog:
        """Open (or create) the log in ``settings.directory``; fail closed on damage.

        Only records something only this gateway can produce vouches for are adopted: those a
        signed checkpoint covers, and after them those the last commit tag covers (written
        after each commit's records are durable and before any is acknowledged, see
        ``_tags.py``). What lies beyond the last tag is one of two things:

        * the commit in flight when the gateway died (records durable, tag not yet written):
          never acknowledged, so nobody holds a receipt for them. They are cut (zeroed, as a
          torn final record is) and an ``anomaly`` record names how many, where, and the
          SHA-256 of the bytes cut. Cutting, not refusing, is what keeps every SIGKILL
          recoverable; cutting, not adopting, is what keeps them unsigned. This is accepted
          only when the last tag is an open one (not written by a clean close), is at least
          as new as the latest checkpoint, and the records all lie in the last segment (one
          commit never spans two).
        * anything else: records appended after a clean close (whose final tag says nothing
          may follow), a log with records but no valid checkpoint or tag (rewritten with its
          checkpoints deleted, or its tags file replaced), records before the last segment.
          The gateway refuses to open (:class:`AuditLogDamaged` names the first unprovable
          record index) and leaves everything in place for investigation.

        A log older than its witness copy (``AuditSettings.witness``) is refused as well:
        the whole directory was rolled back or replaced.
        """
        signer = _keys.load_signer(settings.signing_key)
        payload_key = _keys.load_hmac_key(settings.payload_key)
        try:
            _keys.ensure_commit_key(settings.signing_key)
        except OSError as err:
            raise AuditUnavailable(f"no audit commit tag key beside {settings.signing_key}, "
                                   f"and it cannot be created: {err}") from None
        tag_key = _keys.load_hmac_key(_keys.commit_key_path(settings.signing_key), "commit tag")
        store = FileStore(settings.directory, settings.segment_bytes, settings.segment_seconds,
                          settings.preallocate)
        self = cls(settings, store, signer, payload_key, instance_id, tag_key)
        if self._witness.resolve().is_relative_to(settings.directory.resolve()):
            raise AuditUnavailable(f"the audit witness copy {self._witness} is inside the log "
                                   f"directory {settings.directory}: a rollback of the "
                                   "directory would roll it back too; put it elsewhere")
        cut = None
        try:
            recovered = Recovery(settings.directory, store, self._tree, self._vkey,
                                 self._origin, self._witness).run(tag_key)
            if recovered.checkpoint is not None:
                self._cp_size, self._cp_note = recovered.checkpoint[0].size, recovered.checkpoint[1]
            keep = recovered.keep
            if recovered.torn or keep < recovered.found:
                cut = store.cut(keep)
                self._tree.truncate(keep)
            self._size = self._durable = keep
            self._prev = self._durable_prev = chain_head(self._tree, keep)
            self._tag_serial = recovered.tag.serial if recovered.tag else 0
            # From here on a crash is a crash: replace a closed tag by an open one first.
            self._write_tag(keep, self._durable_prev)
        except StoreDamaged as err:
            store.close()
            raise AuditLogDamaged(f"audit log {settings.directory} is damaged: {err}") from None
        except OSError as err:
            store.close()
            raise AuditUnavailable(f"cannot open audit log {settings.directory}: {err}") from None
        except AuditUnavailable:  # AuditLogDamaged, or an unreadable witness copy
            store.close()
            raise
        records = self._size
        self._writer.start()
        if cut is not None:
            segment, offset, data = cut
            if keep < recovered.found:
                self.append("anomaly", {
                    "event": "unacknowledged-records-cut", "segment": segment, "first": keep,
                    "records": recovered.found - keep, "offset": offset, "bytes": len(data),
                    "sha256": _sha256(data).hexdigest()})
            else:
                self.append("anomaly", {"event": "torn-tail-truncated", "segment": segment,
                                        "offset": offset, "bytes": len(data)})
        self.append("log_open", {"records": records, "origin": self._origin})
        self._checkpoint()  # a running log always has a signed checkpoint to show
        if self._publish_error is not None:
            error = self._publish_error
            self.close()
            raise AuditUnavailable(f"cannot publish the audit log's checkpoint: {error}")
        return self

    # -- appending ----------------------------------------------------------------------------

    def append(self, kind: str, fields: Mapping[str, object]) -> Receipt:
        """Add a record; block until it is durable (``AuditUnavailable`` if it cannot be)."""
        fields = checked_fields(kind, fields)
        _canonical.check(fields, kind)
        if self._publish_error is not None:
            # Fail closed while checkpoints cannot be published, but try again first, as a
            # failed record write is tried again by the next commit.
            self._checkpoint()
            if self._publish_error is not None:
                raise AuditUnavailable("audit log cannot publish its signed checkpoint: "
                                       f"{self._publish_error}")
        with self._lock:
            if self._closing:
                raise AuditUnavailable("audit log is closed")
            seq = self._size
            leaf = self._queue(kind, fields, self._instance, time.time_ns() // 1_000_000)
            self._gathering.arrive()
            batch = self._batch
            lead = self._committer is None
            if lead:
                self._committer = _CALLER
        if lead:
            self._lead()
        batch.wait()
        if batch.error is not None:
            raise AuditUnavailable(f"audit record could not be made durable: {batch.error}")
        return Receipt(seq, leaf)

    def _queue(self, kind: str, fields: Mapping[str, object], instance: str,
               time_ms: int) -> bytes:
        """With the lock held: sequence, chain, encode and queue one record; its leaf hash.

        The one place a record's envelope (the reserved keys) is written, for this process's
        records and for those the hub's LogServer takes from worker processes alike.
        """
        seq = self._size
        # The caller checked fields and kind (append: _canonical.check; the hub: the
        # verifier's canonical rule on the worker's bytes); v, seq and time_ms are ints,
        # instance and prev strings. EncodingError (a lone surrogate) leaves nothing changed.
        data = _canonical.encode_checked({**fields, "v": SCHEMA_VERSION, "seq": seq,
                                          "time_ms": time_ms, "kind": kind,
                                          "instance": instance, "prev": self._prev}, kind)
        leaf = leaf_hash(data)
        self._prev = leaf.hex()
        self._size = seq + 1
        self._pending.append(data)
        self._pending_hashes.append(leaf)
        return leaf

    def submit(self, records: Sequence[tuple[str, Mapping[str, object]]], instance: str,
               then: Callable[[int, list[bytes], _Batch], None]) -> None:
        """Queue records of another process (the hub's LogServer); do not wait for them.

        ``records`` are ``(kind, fields)`` already checked by the caller (canonical values,
        no reserved key, non-empty kind); ``instance`` is the worker that wrote them. They
        get consecutive indexes and go to disk in one commit, made by the writer thread so
        the submitting thread can read the worker's next frame meanwhile. When the commit
        has ended, the committing thread calls ``then(first index, leaf hashes, batch)``:
        ``batch.error`` is None once the records are durable (only then may they be
        acknowledged). It runs on the writer's path, so it must not block. (The worker
        gathered its calls' records before sending them: no announcement is involved.)
        """
        if self._publish_error is not None:
            self._checkpoint()
            if self._publish_error is not None:
                raise AuditUnavailable("audit log cannot publish its signed checkpoint: "
                                       f"{self._publish_error}")
        time_ms = time.time_ns() // 1_000_000
        with self._lock:
            if self._closing:
                raise AuditUnavailable("audit log is closed")
            first = self._size
            leaves = [self._queue(kind, fields, instance, time_ms) for kind, fields in records]
            self._batch.then.append(functools.partial(then, first, leaves))
            if self._committer is None:
                self._committer = _WRITER
                self._wake.notify()

    def payload_digest(self, *chunks: bytes) -> str:
        """Keyed HMAC-SHA256 of the request payload, hex: records show equality, never content."""
        return self._payload_digest(chunks)

    def announce(self) -> None:
        """Say that a call has started which will append one record when it ends.

        Only a hint for group commit: a committer waits (at most ``group_commit_window_us``)
        until every announced call has queued its record, so that under load one write and
        one flush carry many records. Each :meth:`append` consumes one announcement.
        """
        with self._lock:
            self._gathering.announce()

    def _gather(self) -> None:
        """With the lock held: wait briefly for announced records to join this commit."""
        self._gathering.wait(lambda: not self._closing)

    @property
    def healthy(self) -> bool:
        """False after a write or fsync failure, until a later commit succeeds, and while the
        latest checkpoint (or its witness copy) cannot be published."""
        return self._healthy and self._publish_error is None and not self._closed

    # -- the writer thread --------------------------------------------------------------------

    def _lead(self) -> None:
        """Commit what is pending in the caller's own thread (no hand-off when the log is idle).

        Records that arrive meanwhile are left to the writer thread, so that no caller keeps
        committing other callers' records before its own response can leave.
        """
        with self._lock:
            self._gather()
            records, hashes, batch = self._take()
        self._commit(records, hashes, batch)
        with self._lock:
            if self._pending:
                self._committer = _WRITER
                self._wake.notify()
            else:
                self._committer = None
                if self._closing:
                    self._wake.notify()  # close() waits for the writer to sign and stop

    def _take(self) -> tuple[list[bytes], list[bytes], _Batch]:
        taken = self._pending, self._pending_hashes, self._batch
        self._pending, self._pending_hashes, self._batch = [], [], _Batch()
        return taken

    def _run(self) -> None:
        """The writer thread: commits under load (group commit) and publishes checkpoints."""
        every = self._settings.checkpoint_records
        interval = self._settings.checkpoint_ms / 1000
        while True:
            with self._lock:
                while True:
                    if self._committer == _WRITER:
                        break
                    if self._closing and self._committer is None:
                        break
                    unsigned = self._durable - self._cp_size
                    due = self._unsigned_since + interval - time.monotonic()
                    if unsigned > 0 and (unsigned >= every or due <= 0):
                        break
                    self._wake.wait(timeout=max(due, 0.001) if unsigned > 0 else None)
                closing = self._closing
                mine = self._committer == _WRITER or (closing and self._committer is None)
                if mine:
                    self._committer = _WRITER
            if mine:
                while True:
                    with self._lock:
                        if not self._pending:
                            self._committer = None
                            break
                        self._gather()
                        records, hashes, batch = self._take()
                    self._commit(records, hashes, batch)
                    if self._checkpoint_due(every, interval):
                        # Under steady load records may be pending after every commit: the
                        # checkpoint cannot wait for a quiet moment (early is harmless, late
                        # is not).
                        self._checkpoint()
            if self._checkpoint_due(every, interval) or (
                    closing and self._durable > self._cp_size):
                self._checkpoint()
            if closing:
                with self._lock:
                    if not self._pending and self._committer is None:
                        return

    def _checkpoint_due(self, every: int, interval: float) -> bool:
        unsigned = self._durable - self._cp_size
        return unsigned > 0 and (unsigned >= every
                                 or time.monotonic() - self._unsigned_since >= interval)

    def observe_commits(self, callback: Callable[[float, int], None]) -> None:
        """Call ``callback(seconds, records)`` after every durable commit (for metrics)."""
        self._on_commit = callback

    @property
    def checkpoint_age(self) -> float:
        """Seconds since the latest checkpoint was signed."""
        return time.monotonic() - self._cp_time

    def _commit(self, records: list[bytes], hashes: list[bytes], batch: _Batch) -> None:
        started = time.perf_counter()
        # Durable with the records, before any of them is acknowledged: only the gateway can
        # vouch for them (see _tags.py).
        tag = CommitTag(self._tag_serial + 1, self._durable + len(records), hashes[-1].hex())
        try:
            self._store.append(records, (tag.serial % _tags.SLOTS,
                                         _tags.seal(self._tag_key, self._origin, tag)))
        except OSError as err:
            log.error("audit log write failed: %s", err)
            with self._lock:
                # Records queued after this batch chained onto it: fail them too, and roll
                # the chain back to the last durable record.
                later, self._batch = self._batch, _Batch()
                self._pending, self._pending_hashes = [], []
                self._size, self._prev = self._durable, self._durable_prev
                self._healthy = False
            for b in (batch, later):
                b.finish(err)
            return
        self._tag_serial = tag.serial
        with self._tree_lock:
            for h in hashes:
                self._tree.append(h)
            first_unsigned = self._durable == self._cp_size
            self._durable += len(records)
        self._durable_prev = hashes[-1].hex()
        self._healthy = True
        batch.records, batch.seconds = len(records), time.perf_counter() - started
        batch.finish()
        if self._on_commit is not None:
            self._on_commit(batch.seconds, len(records))
        if first_unsigned:
            self._unsigned_since = time.monotonic()
        if first_unsigned or self._durable - self._cp_size >= self._settings.checkpoint_records:
            with self._lock:
                self._wake.notify()  # the writer's checkpoint timer starts (or fires) now

    def _write_tag(self, size: int, head: str, *, closed: bool = False) -> None:
        """Durably write the next commit tag (one HMAC, one small write); see ``_tags.py``."""
        tag = CommitTag(self._tag_serial + 1, size, head, closed)
        self._store.write_tag(tag.serial % _tags.SLOTS,
                              _tags.seal(self._tag_key, self._origin, tag))
        self._tag_serial = tag.serial

    def _checkpoint(self) -> None:
        """Sign the durable records; publish in the log directory, then the witness copy."""
        with self._cp_lock:
            started = time.monotonic()
            size = self._durable
            if self._cp_note is not None and size == self._cp_size and not self._publish_error:
                return
            with self._tree_lock:
                root = self._tree.root(size)
            note = self._signer.sign(Checkpoint(self._origin, size, root).text())
            try:
                self._store.publish(note)
                # Last, so the witness is never newer than the log it vouches for.
                self._witness.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_atomic(self._witness, note.encode())
            except OSError as err:
                log.error("audit checkpoint could not be published: %s", err)
                self._publish_error = err
                self._unsigned_since = time.monotonic()  # the writer retries one interval on
                return
            self._publish_error = None
            with self._tree_lock:  # as _commit's first_unsigned test: one or the other
                self._cp_size, self._cp_note, self._cp_time = size, note, time.monotonic()
                if self._durable > size:
                    # Records committed while this one was signed and published: none
                    # became durable before ``started``, so their checkpoint is due an
                    # interval after it. (Left alone, the timer still ran from the
                    # previous interval: under steady load the writer signed back to back,
                    # four syncs and two renames each, not once per interval.)
                    self._unsigned_since = started

    def fresh_checkpoint(self) -> str | None:
        """A signed checkpoint covering every record durable now (signing one if needed).

        Auditors asking for the latest state get it at once rather than at the next
        periodic checkpoint; signing is serialised, so checkpoints stay in size order.
        """
        if self._durable != self._cp_size or self._cp_note is None:
            self._checkpoint()
        return self._cp_note

    # -- reading (for the AuditService) -------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of durable records."""
        return self._durable

    def checkpoint(self) -> str | None:
        """The latest signed checkpoint note, or None before the first one."""
        return self._cp_note

    def entries(self, start: int, end: int) -> list[bytes]:
        """Canonical bytes of records ``[start, end)`` (clamped to the durable size)."""
        end = min(end, self._durable)
        return self._store.read(start, end) if start < end else []

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        with self._tree_lock:
            return self._tree.inclusion_proof(index, size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        with self._tree_lock:
            return self._tree.consistency_proof(first, second)

    def root(self, size: int) -> bytes:
        with self._tree_lock:
            return self._tree.root(size)

    def checkpoint_note(self, size: int) -> str | None:
        """The signed checkpoint of exactly ``size`` records, if the log published one."""
        if size == self._cp_size:
            return self._cp_note
        for note in reversed(read_checkpoints(self._settings.directory)):
            if note.split("\n", 2)[1] == str(size):
                return note
        return None

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Write a ``log_close`` record, publish a final checkpoint, stop the writer and
        write the closing commit tag (after which no record may follow: see :meth:`open`)."""
        if self._closed:
            return
        try:
            self.append("log_close", {"records": self._size + 1})
        except AuditUnavailable as err:
            log.error("audit log_close record not written: %s", err)
        with self._lock:
            self._closing = True
            self._wake.notify()
            self._gathering.interrupt()
        self._writer.join()
        self._closed = True
        if self._healthy:
            # Unhealthy: a failed write may have left bytes past the durable end, which only
            # the next open (seeing an open tag) may cut; so no closing tag then.
            try:
                self._write_tag(self._durable, self._durable_prev, closed=True)
            except OSError as err:
                log.error("audit closing commit tag not written: %s", err)
        self._store.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

