"""The audit log in PostgreSQL: one log (one index space, one hash chain, one Merkle tree) for
every replica and worker process that opens the same schema.

    log = PgAuditLog.open(settings, instance_id="gw-a")   # settings.backend == "postgresql"
    receipt = log.append("decision", {...})                # durable in PostgreSQL on return

Records, leaf hashes, checkpoints (C2SP notes, the same signing key) and proofs are exactly
those of the file log; only where the bytes live differs (tables in ``_pgschema``).

**Sequencing.** A record's bytes hold its index and the leaf hash of the record before it, so
indices are assigned under the head row's lock: one transaction locks the head, encodes the
batch (every record the process's callers queued meanwhile: group commit), inserts it and
moves the head. That transaction commits with ``synchronous_commit = off``, so the lock is
released without waiting for the WAL flush, and the next batch, from this process or another,
can be sequenced at once. Durability comes from a *barrier* on a second connection: a tiny
transaction of this process's own (its ``gateway_audit_writer`` row) that commits
synchronously, started after the batches it covers committed. PostgreSQL flushes WAL in
order, so when the barrier's commit is durable so are they; one barrier covers every batch
sequenced while the previous flush was under way, and concurrent barriers of all processes
share flushes. Only then are the callers answered. A record is therefore never acknowledged
before it is durable, and a database crash can lose only a suffix of records nobody was
answered for (a later commit is never durable without the earlier ones). Two threads per
process, the sequencer and the flusher, each with its own connection; with the integrator's
and two for reads, a process holds at most five.

**Checkpoints.** Exactly one process signs: the holder of the lease row
(``gateway_audit_lease``), which every process tries to take when it has expired and its
holder renews every tick. Each change of holder bumps the lease ``epoch``; a checkpoint is
stored in a transaction that first locks the lease row and checks that this process still
holds it at that epoch and that the new size extends the latest stored checkpoint (whose root
it re-checks against its own tree). A paused or partitioned former integrator therefore
cannot store anything, and two stored checkpoints can never disagree. When the integrator
dies, its lease expires (``lease_ms``) and another process takes over.

**Every process serves proofs.** Each keeps the Merkle tree in memory by reading the rows it
has not seen (at open, every tick, and on demand for a proof), recomputing every leaf hash and
checking every record's ``seq`` and ``prev``; a mismatch is damage, and the log then refuses
to append or sign (fail closed).

**Failure.** A statement that fails (database down, connection ended) fails the batch's calls
with AuditUnavailable and turns ``healthy`` False; the connection is dropped and reopened by
the next batch, and a tick that reaches the database turns ``healthy`` back, with no restart.
A batch whose outcome is unknown (the connection broke during COMMIT) is never retried: its
records may be in the log, but nobody was answered for them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import psycopg

from gateway._atomic import write_atomic
from gateway.audit import _canonical, _keys
from gateway.audit._log import PayloadDigest, Receipt, checked_fields
from gateway.audit._merkle import Tree, leaf_hash
from gateway.audit._note import Checkpoint, NoteError, open_checkpoint, parse_vkey
from gateway.audit._pgschema import CHUNK, SCHEMA, SCHEMA_LOCK
from gateway.audit._recovery import AuditLogDamaged
from gateway.audit._verify import GENESIS_PREV, SCHEMA_VERSION
from gateway.db import DatabaseUnavailable, connect, open_pool, redact, resolve_dsn
from gateway.errors import AuditUnavailable

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from gateway.audit import AuditSettings
    from gateway.audit._note import Signer

log = logging.getLogger("gateway.audit")

#: The connections of a process's two committing threads.
_SEQUENCER, _FLUSHER = 0, 1

_sha256 = hashlib.sha256
_loads = _canonical._json_loads

_SEQUENCE_HEAD = "SELECT size, prev FROM gateway_audit_log FOR UPDATE"
_INSERT = ("INSERT INTO gateway_audit_record (seq, data) "
           "SELECT * FROM unnest(%s::bigint[], %s::bytea[])")
_MOVE_HEAD = "UPDATE gateway_audit_log SET size = %s, prev = %s"
# Always writes (and so always has a commit record to flush), even if the row was deleted.
_BARRIER = ("INSERT INTO gateway_audit_writer (instance, commits) VALUES (%s, 1) "
            "ON CONFLICT (instance) DO UPDATE "
            "SET commits = gateway_audit_writer.commits + 1, seen = now()")
_TAKE_LEASE = """
UPDATE gateway_audit_lease
   SET epoch = CASE WHEN holder = %(me)s AND expires > now() THEN epoch ELSE epoch + 1 END,
       holder = %(me)s,
       expires = now() + make_interval(secs => %(ttl)s)
 WHERE holder = %(me)s OR expires <= now()
RETURNING epoch"""
_LATEST = ("SELECT size, note, extract(epoch FROM now() - signed_at)::float8 "
           "FROM gateway_audit_checkpoint ORDER BY size DESC LIMIT 1")


class _Batch:
    """The records of one commit; callers wait in :meth:`wait` (see ``_log._Batch``)."""

    __slots__ = ("_lock", "count", "error", "first", "leaves", "started")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.error: BaseException | None = None
        self.first = 0
        self.count = 0
        self.leaves: list[bytes] = []
        self.started = 0.0

    def wait(self) -> None:
        self._lock.acquire()
        self._lock.release()

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._lock.release()


def _session(conn: psycopg.Connection) -> psycopg.Connection:
    """Durable commits for this session even if the server's default says otherwise."""
    row = conn.execute("SHOW synchronous_commit").fetchone()
    if row is not None and row[0] == "off":
        conn.execute("SET synchronous_commit TO on")
    return conn


class PgAuditLog:
    """An :class:`~gateway.audit.AuditSink` whose records live in PostgreSQL (module doc)."""

    def __init__(self, settings: AuditSettings, dsn: str, signer: Signer, payload_key: bytes,
                 instance_id: str) -> None:
        self._settings = settings
        self._dsn = dsn
        self._signer = signer
        self._origin = signer.name
        self._vkey = parse_vkey(signer.vkey)
        self._payload_digest = PayloadDigest(payload_key)
        self._instance = instance_id
        # Unique per process: the lease names its holder by it.
        self._me = f"{instance_id} pid {os.getpid()} {secrets.token_hex(4)}"
        self._witness = settings.witness_path()
        self._lease_s = settings.lease_ms / 1000
        self._tick = min(settings.checkpoint_ms / 1000, self._lease_s / 3)
        self._tree = Tree()
        self._tree_lock = threading.Lock()     # the tree's contents
        self._catchup_lock = threading.Lock()  # one reader of new rows at a time
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[tuple[str, dict[str, object]]] = []
        self._batch = _Batch()
        self._closing = False
        self._closed = False
        self._known = 0          # records durable in the log, as far as this process knows
        self._own_end = 0        # end of this process's last acknowledged batch
        self._ok = True          # the database answered the last statement
        self._damage: str | None = None
        self._on_commit: Callable[[float, int], None] | None = None
        self._cp_lock = threading.Lock()
        self._cp_size = -1
        self._cp_note: str | None = None
        self._cp_age_at = 0.0    # checkpoint's age when read, and when (monotonic)
        self._cp_read_at = time.monotonic()
        self._epoch: int | None = None  # lease epoch while this process is the integrator
        self._sign_now = threading.Event()
        self._stop = threading.Event()
        self._conns: list[psycopg.Connection | None] = [None, None]
        self._flush_wake = threading.Condition(threading.Lock())
        self._flushing: list[_Batch] = []      # sequenced, not yet durable
        self._sequencer_done = False
        self._service: psycopg.Connection | None = None
        self._pool: ConnectionPool | None = None
        self._threads = [threading.Thread(target=self._sequencer, daemon=True,
                                          name="audit-pg-sequencer"),
                         threading.Thread(target=self._flusher, daemon=True,
                                          name="audit-pg-flusher")]
        self._integrator = threading.Thread(target=self._run_integrator, daemon=True,
                                            name="audit-pg-integrator")

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: AuditSettings, *, instance_id: str) -> PgAuditLog:
        """Connect, create the tables if absent, load and check the tree, start the threads.

        Fails closed: AuditUnavailable when the database cannot be reached or the log is
        another key's; AuditLogDamaged when stored records break the chain or no longer give
        a stored checkpoint's root, or the log is older than this replica's witness copy.
        """
        dsn = resolve_dsn(settings.dsn)
        signer = _keys.load_signer(settings.signing_key)
        payload_key = _keys.load_hmac_key(settings.payload_key)
        self = cls(settings, dsn, signer, payload_key, instance_id)
        try:
            self._service = _session(connect(dsn, name=f"gateway-audit {instance_id}"))
            self._create()
            with self._catchup_lock:
                self._catch_up(self._service)
            self._refresh_checkpoint(self._service)
            self._check_witness()
            self._pool = open_pool(dsn, name=f"gateway-audit-read {instance_id}",
                                   min_size=1, max_size=2)
        except (psycopg.Error, OSError, DatabaseUnavailable) as err:
            self._close_connections()
            raise AuditUnavailable(f"cannot open the audit log in PostgreSQL at "
                                   f"{redact(dsn)}: {str(err).strip()}") from None
        except AuditUnavailable:  # AuditLogDamaged, a foreign key
            self._close_connections()
            raise
        records = self._known
        for t in self._threads:
            t.start()
        try:
            self.append("log_open", {"records": records, "origin": self._origin})
        except AuditUnavailable:
            self._shutdown()
            self._close_connections()
            raise
        self._integrate()  # a running log has a signed checkpoint to show, if it can sign
        self._integrator.start()
        return self

    def _create(self) -> None:
        conn = self._service
        assert conn is not None
        with conn.transaction():
            conn.execute(SCHEMA_LOCK)
            conn.execute(SCHEMA)
            conn.execute("INSERT INTO gateway_audit_log (origin, vkey, size, prev) "
                         "VALUES (%s, %s, 0, %s) ON CONFLICT DO NOTHING",
                         (self._origin, self._signer.vkey, GENESIS_PREV))
            row = conn.execute("SELECT origin, vkey FROM gateway_audit_log").fetchone()
        assert row is not None
        if (row[0], row[1]) != (self._origin, self._signer.vkey):
            raise AuditUnavailable(f"the audit log in PostgreSQL at {redact(self._dsn)} is "
                                   f"{row[0]!r}, signed by {row[1]}; this replica's key "
                                   f"{self._settings.signing_key} is {self._signer.vkey}: "
                                   "every replica needs the log's own keys")

    def _check_witness(self) -> None:
        """Refuse a log older than this replica's witness copy (the database rolled back)."""
        try:
            note = self._witness.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as err:
            raise AuditUnavailable(f"cannot read the audit witness copy {self._witness}: "
                                   f"{err}") from None
        try:
            cp, _ = open_checkpoint(note, self._vkey, self._origin)
        except NoteError as err:
            raise AuditLogDamaged(f"the audit witness copy {self._witness} does not verify: "
                                  f"{err}") from None
        with self._tree_lock:
            size = self._tree.size
            same = cp.size <= size and self._tree.root(cp.size) == cp.root
        if not same:
            raise AuditLogDamaged(f"the audit log in PostgreSQL ({size} records) does not "
                                  f"extend this replica's witness copy {self._witness} "
                                  f"(size {cp.size}): the database was rolled back or "
                                  "replaced")

    # -- appending ----------------------------------------------------------------------------

    def append(self, kind: str, fields: Mapping[str, object]) -> Receipt:
        """Add a record; block until it is durable in PostgreSQL (AuditUnavailable if not)."""
        fields = checked_fields(kind, fields)
        _canonical.check(fields, kind)
        if self._damage is not None:
            raise AuditLogDamaged(self._damage)
        with self._lock:
            if self._closing:
                raise AuditUnavailable("audit log is closed")
            batch = self._batch
            position = len(self._pending)
            self._pending.append((kind, fields))
            if position == 0:
                self._wake.notify()
        batch.wait()
        if batch.error is not None:
            raise AuditUnavailable(f"audit record could not be made durable in PostgreSQL: "
                                   f"{batch.error}")
        return Receipt(batch.first + position, batch.leaves[position])

    def announce(self) -> None:
        """No-op: batches form by themselves while a commit is in flight (the database
        round trip is far longer than the time a call takes to queue its record)."""

    def payload_digest(self, *chunks: bytes) -> str:
        """Keyed HMAC-SHA256 of the request payload, hex (the same key on every replica)."""
        return self._payload_digest(chunks)

    def _connection(self, i: int) -> psycopg.Connection:
        conn = self._conns[i]
        if conn is None or conn.closed:
            conn = self._conns[i] = _session(connect(
                self._dsn, name=f"gateway-audit {self._instance}"))
        return conn

    def _sequencer(self) -> None:
        """Assign indices to what callers queued, batch by batch; hand each to the flusher."""
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    break
                items, batch = self._pending, self._batch
                self._pending, self._batch = [], _Batch()
            self._sequence(items, batch)
        with self._flush_wake:
            self._sequencer_done = True
            self._flush_wake.notify()

    def _sequence(self, items: list[tuple[str, dict[str, object]]], batch: _Batch) -> None:
        """One short transaction under the head row's lock, committed without waiting for
        the WAL flush (module doc); the flusher makes it durable."""
        batch.started = time.perf_counter()
        for attempt in (1, 2):
            locked = False
            try:
                conn = self._connection(_SEQUENCER)
                with conn.pipeline() as pipe:
                    conn.execute("BEGIN")
                    conn.execute("SET LOCAL synchronous_commit TO off")
                    head = conn.execute(_SEQUENCE_HEAD)
                    pipe.sync()
                    row = head.fetchone()
                    locked = True
                    if row is None:
                        raise AuditLogDamaged("the audit log's head row is missing")
                    size, prev = int(row[0]), str(row[1])
                    seqs, datas, leaves = self._encode(items, size, prev)
                    conn.execute(_INSERT, (seqs, datas))
                    conn.execute(_MOVE_HEAD, (size + len(items), leaves[-1].hex()))
                    conn.execute("COMMIT")
                break
            except psycopg.OperationalError as err:
                if attempt == 1 and not locked:
                    # Nothing was written: the connection had been ended while idle (a
                    # restart, pg_terminate_backend). Once more on a new one.
                    self._drop(_SEQUENCER)
                    continue
                self._fail(_SEQUENCER, [batch], err)
                return
            except Exception as err:  # whatever it is, its callers must not hang
                self._fail(_SEQUENCER, [batch], err)
                return
        batch.first, batch.leaves, batch.count = size, leaves, len(items)
        with self._flush_wake:
            self._flushing.append(batch)
            self._flush_wake.notify()

    def _flusher(self) -> None:
        """Make sequenced batches durable, all those waiting with one barrier, then answer
        their callers."""
        while True:
            with self._flush_wake:
                while not self._flushing and not self._sequencer_done:
                    self._flush_wake.wait()
                if not self._flushing:
                    return
                batches, self._flushing = self._flushing, []
            error = None
            for _attempt in (1, 2):  # a barrier may be repeated: it only flushes
                try:
                    conn = self._connection(_FLUSHER)
                    # Its synchronous commit flushes the WAL past every batch before it.
                    with conn.transaction():
                        conn.execute(_BARRIER, (self._instance,))
                    error = None
                    break
                except Exception as err:  # whatever it is, its callers must not hang
                    error = err
                    self._drop(_FLUSHER)
            if error is not None:
                self._fail(_FLUSHER, batches, error)
                continue
            end = max(b.first + b.count for b in batches)
            with self._lock:
                self._known = max(self._known, end)
                self._own_end = max(self._own_end, end)
            self._mark(True)
            for b in batches:
                b.finish()
            if self._on_commit is not None:
                now = time.perf_counter()
                for b in batches:
                    self._on_commit(now - b.started, b.count)
            if end - self._cp_size >= self._settings.checkpoint_records \
                    and self._epoch is not None:
                self._sign_now.set()

    def _fail(self, i: int, batches: list[_Batch], err: BaseException) -> None:
        """A statement failed: drop the connection (the next batch opens a new one) and fail
        the batches' calls. Their records may be in the log, but nobody is answered."""
        self._drop(i)
        if not isinstance(err, AuditLogDamaged):
            self._mark(False, err)
        log.error("audit records not committed (%d batches): %s", len(batches),
                  str(err).strip())
        for b in batches:
            b.finish(err)

    def _encode(self, items: list[tuple[str, dict[str, object]]], size: int,
                prev: str) -> tuple[list[int], list[bytes], list[bytes]]:
        """The records of a batch at indices ``size, size + 1, ...`` chained onto ``prev``."""
        seqs, datas, leaves = [], [], []
        now = time.time_ns() // 1_000_000
        for n, (kind, fields) in enumerate(items):
            seq = size + n
            if kind == "log_close":
                fields = {**fields, "records": seq + 1}  # the log's size with this record
            data = _canonical.encode({**fields, "v": SCHEMA_VERSION, "seq": seq,
                                      "time_ms": now, "kind": kind,
                                      "instance": self._instance, "prev": prev})
            leaf = leaf_hash(data)
            prev = leaf.hex()
            seqs.append(seq)
            datas.append(data)
            leaves.append(leaf)
        return seqs, datas, leaves

    def _drop(self, i: int) -> None:
        conn, self._conns[i] = self._conns[i], None
        if conn is not None:
            conn.close()

    def _mark(self, ok: bool, err: BaseException | None = None) -> None:
        if self._ok and not ok:
            log.error("audit log in PostgreSQL unavailable: %s; calls fail closed",
                      str(err).strip())
        elif ok and not self._ok:
            log.warning("audit log in PostgreSQL reachable again")
        self._ok = ok

    @property
    def healthy(self) -> bool:
        """False while the database does not answer, after damage, and once closed."""
        return self._ok and self._damage is None and not self._closed

    def observe_commits(self, callback: Callable[[float, int], None]) -> None:
        """Call ``callback(seconds, records)`` after every durable batch (for metrics)."""
        self._on_commit = callback

    # -- the tree -----------------------------------------------------------------------------

    def _catch_up(self, conn: psycopg.Connection, target: int | None = None) -> None:
        """Read the records the tree lacks (up to ``target``, default the head), checking
        every ``seq`` and ``prev``; AuditLogDamaged on a mismatch. Hold ``_catchup_lock``."""
        if target is None:
            row = conn.execute("SELECT size FROM gateway_audit_log").fetchone()
            target = int(row[0]) if row is not None else 0
        while True:
            with self._tree_lock:
                start = self._tree.size
                prev = self._tree.leaf(start - 1).hex() if start else GENESIS_PREV
            if start >= target:
                break
            rows = conn.execute("SELECT seq, data FROM gateway_audit_record WHERE seq >= %s "
                                "AND seq < %s ORDER BY seq LIMIT %s",
                                (start, target, CHUNK)).fetchall()
            hashes = []
            for expected, (seq, data) in enumerate(rows, start):
                data = bytes(data)
                problem = _link_problem(data, expected, seq, prev)
                if problem is not None:
                    self._damage = (f"the audit log in PostgreSQL is damaged at record "
                                    f"{expected}: {problem}")
                    raise AuditLogDamaged(self._damage)
                leaf = leaf_hash(data)
                prev = leaf.hex()
                hashes.append(leaf)
            if not hashes:
                self._damage = (f"the audit log in PostgreSQL is damaged: its head says "
                                f"{target} records but record {start} is missing")
                raise AuditLogDamaged(self._damage)
            with self._tree_lock:
                self._tree.extend(hashes)
        with self._lock:
            self._known = max(self._known, target)

    def _ensure(self, size: int) -> None:
        """Have the tree hold at least ``size`` records (read on demand, for a proof)."""
        with self._tree_lock:
            if self._tree.size >= size:
                return
        if self._damage is not None:
            raise AuditLogDamaged(self._damage)
        with self._catchup_lock, self._reader() as conn:
            self._catch_up(conn, size)

    def _reader(self) -> Any:
        if self._pool is None:
            raise AuditUnavailable("audit log is not open")
        return self._pool.connection()

    # -- checkpoints: the integrator ------------------------------------------------------------

    def _run_integrator(self) -> None:
        while True:
            self._sign_now.wait(self._tick)
            if self._stop.is_set():
                return
            self._sign_now.clear()
            self._integrate()

    def _integrate(self) -> None:
        """One tick: take or renew the lease; as its holder sign what is unsigned; else (and
        also) read the latest checkpoint and the new rows."""
        try:
            conn = self._service
            if conn is None or conn.closed:
                conn = self._service = _session(connect(
                    self._dsn, name=f"gateway-audit {self._instance}"))
            row = conn.execute(_TAKE_LEASE, {"me": self._me, "ttl": self._lease_s}).fetchone()
            epoch = int(row[0]) if row is not None else None
            if epoch != self._epoch:
                if epoch is not None:
                    log.warning("audit log integrator: %s (lease epoch %d)", self._me, epoch)
                self._epoch = epoch
            with self._catchup_lock:
                self._catch_up(conn)
            if epoch is not None and self._damage is None:
                self._sign(conn, epoch)
            self._refresh_checkpoint(conn)
        except (psycopg.Error, OSError, DatabaseUnavailable) as err:
            self._mark(False, err)
            if self._service is not None:
                self._service.close()
            self._service = None
            return
        except AuditLogDamaged as err:
            log.error("%s; no more records or checkpoints", err)
            return
        self._mark(True)

    def _sign(self, conn: psycopg.Connection, epoch: int) -> None:
        """Sign the tree as read, and store it fenced by the lease epoch (module doc)."""
        with self._cp_lock:
            with self._tree_lock:
                size = self._tree.size
                if size == 0 or size <= self._cp_size:
                    return
                root = self._tree.root(size)
            note = self._signer.sign(Checkpoint(self._origin, size, root).text())
            with conn.transaction():
                held = conn.execute("SELECT 1 FROM gateway_audit_lease WHERE holder = %s AND "
                                    "epoch = %s AND expires > now() FOR UPDATE",
                                    (self._me, epoch)).fetchone()
                if held is None:
                    self._epoch = None
                    return
                latest = conn.execute("SELECT size, note FROM gateway_audit_checkpoint "
                                      "ORDER BY size DESC LIMIT 1").fetchone()
                if latest is not None:
                    if int(latest[0]) >= size:
                        return
                    self._check_extends(str(latest[1]), conn)
                conn.execute("INSERT INTO gateway_audit_checkpoint (size, note, epoch, signer) "
                             "VALUES (%s, %s, %s, %s)", (size, note, epoch, self._me))
            self._cp_size, self._cp_note = size, note
            self._cp_age_at, self._cp_read_at = 0.0, time.monotonic()
        self._keep_witness(note)

    def _keep_witness(self, note: str) -> None:
        """Copy a stored (never a merely signed) checkpoint to this replica's witness file,
        so that a database later rolled back behind it is refused at open."""
        try:
            self._witness.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self._witness, note.encode())
        except OSError as err:
            log.error("audit witness copy %s not written: %s", self._witness, err)

    def _check_extends(self, note: str, conn: psycopg.Connection) -> None:
        """The tree must hold the stored checkpoint's records unchanged (else: damage)."""
        try:
            cp, _ = open_checkpoint(note, self._vkey, self._origin)
        except NoteError as err:
            self._damage = f"a checkpoint stored in PostgreSQL does not verify: {err}"
            raise AuditLogDamaged(self._damage) from None
        with self._catchup_lock:
            self._catch_up(conn, cp.size)
        with self._tree_lock:
            same = cp.size <= self._tree.size and self._tree.root(cp.size) == cp.root
        if not same:
            self._damage = (f"the audit records in PostgreSQL no longer give the root the "
                            f"checkpoint of size {cp.size} signs")
            raise AuditLogDamaged(self._damage)

    def _refresh_checkpoint(self, conn: psycopg.Connection) -> None:
        row = conn.execute(_LATEST).fetchone()
        if row is None:
            return
        size, note = int(row[0]), str(row[1])
        with self._cp_lock:
            if size <= self._cp_size:
                return
            self._check_extends(note, conn)
            self._cp_size, self._cp_note = size, note
            self._cp_age_at, self._cp_read_at = float(row[2]), time.monotonic()
        self._keep_witness(note)

    @property
    def checkpoint_age(self) -> float:
        """Seconds since the latest checkpoint this process knows of was signed."""
        return self._cp_age_at + time.monotonic() - self._cp_read_at

    def checkpoint(self) -> str | None:
        """The latest signed checkpoint this process knows of (read every tick)."""
        return self._cp_note

    def fresh_checkpoint(self) -> str | None:
        """A signed checkpoint covering every record this process has acknowledged.

        The integrator signs one at once; another process waits for the integrator's next
        one (about ``checkpoint_ms``; at most that plus the lease, after which a new
        integrator has taken over), then gives the latest it has.
        """
        target = self._own_end
        if self._cp_size >= target:
            return self._cp_note
        if self._epoch is not None:
            self._sign_now.set()
        deadline = time.monotonic() + self._settings.checkpoint_ms / 1000 + self._lease_s
        while self._cp_size < target and time.monotonic() < deadline \
                and not self._stop.is_set():
            try:
                with self._reader() as conn:
                    self._refresh_checkpoint(conn)
            except (psycopg.Error, OSError, DatabaseUnavailable):
                break
            except AuditLogDamaged:
                break
            if self._cp_size < target:
                self._stop.wait(0.05)
        return self._cp_note

    # -- reading -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Records durable in the log as far as this process knows (its own commits and
        what it has read)."""
        return self._known

    def entries(self, start: int, end: int) -> list[bytes]:
        """Canonical bytes of records ``[start, end)`` (clamped to the known size)."""
        end = min(end, self._known)
        if start >= end:
            return []
        try:
            with self._reader() as conn:
                rows = conn.execute("SELECT data FROM gateway_audit_record WHERE seq >= %s "
                                    "AND seq < %s ORDER BY seq", (start, end)).fetchall()
        except (psycopg.Error, OSError) as err:
            raise AuditUnavailable(f"audit log in PostgreSQL unreachable: "
                                   f"{str(err).strip()}") from None
        return [bytes(r[0]) for r in rows]

    def _proving(self, size: int) -> None:
        try:
            self._ensure(size)
        except (psycopg.Error, OSError) as err:
            raise AuditUnavailable(f"audit log in PostgreSQL unreachable: "
                                   f"{str(err).strip()}") from None

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._proving(size)
        with self._tree_lock:
            return self._tree.inclusion_proof(index, size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        self._proving(second)
        with self._tree_lock:
            return self._tree.consistency_proof(first, second)

    def root(self, size: int) -> bytes:
        self._proving(size)
        with self._tree_lock:
            return self._tree.root(size)

    def checkpoint_note(self, size: int) -> str | None:
        """The stored checkpoint of exactly ``size`` records, if one was signed."""
        if size == self._cp_size:
            return self._cp_note
        try:
            with self._reader() as conn:
                row = conn.execute("SELECT note FROM gateway_audit_checkpoint WHERE size = %s",
                                   (size,)).fetchone()
        except (psycopg.Error, OSError) as err:
            raise AuditUnavailable(f"audit log in PostgreSQL unreachable: "
                                   f"{str(err).strip()}") from None
        return None if row is None else str(row[0])

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Write a ``log_close`` record, sign a final checkpoint if this process is the
        integrator and hand the lease on at once, release the connections."""
        if self._closed:
            return
        try:
            self.append("log_close", {"records": 0})  # the size is filled in at sequencing
        except AuditUnavailable as err:
            log.error("audit log_close record not written: %s", err)
        self._shutdown()
        # The final checkpoint, covering log_close: as the integrator, or by taking the
        # lease if the integrator is gone (a live one signs it within its tick anyway).
        self._integrate()
        if self._epoch is not None:
            try:
                if self._service is not None:
                    self._service.execute("UPDATE gateway_audit_lease SET expires = "
                                          "'-infinity' WHERE holder = %s", (self._me,))
            except psycopg.Error as err:
                log.error("audit lease not released (it expires by itself): %s", err)
        self._closed = True
        self._close_connections()

    def _shutdown(self) -> None:
        """Stop taking records, commit what is queued, stop the threads."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join()
        self._stop.set()
        self._sign_now.set()
        if self._integrator.is_alive():
            self._integrator.join()

    def _close_connections(self) -> None:
        for i in (_SEQUENCER, _FLUSHER):
            self._drop(i)
        if self._service is not None:
            self._service.close()
            self._service = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> PgAuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _link_problem(data: bytes, expected: int, seq: int, prev: str) -> str | None:
    """Why a stored record does not sit at ``expected`` after the leaf ``prev`` (or None)."""
    if seq != expected:
        return f"record {expected} is missing (the next stored is {seq})"
    try:
        record = _loads(data)
    except ValueError as err:
        return f"not a JSON record ({err})"
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("seq") != expected:
        return f"its seq is {record.get('seq')!r}"
    if record.get("prev") != prev:
        return "its prev is not the leaf hash of the record before it"
    return None
