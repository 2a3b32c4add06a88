"""The ``postgresql`` backend's usage windows: every replica's background-scoring rows, scored
by one replica at a time, so extraction detection sees a caller's traffic across replicas.

**Replicas** (:class:`PgUsageSink`) queue a request's rows in memory (bounded) and insert
them off the request path, one row of ``gateway_usage`` per batch (every ``interval_s``): the
same encoding as the hub's socket (:func:`~gateway.state._host.encode_usage`: a JSON header,
each distinct profile once, arrays as raw bytes with dtype and shape; never pickle). A
request that cannot be queued (queue full) or whose batch cannot be written (the database
unreachable) is dropped and counted, as the host sink does (``gateway_unscored_requests_total``);
the sink never blocks a call and writes again once the database is back.

**The scorer** (:class:`PgUsageScorer`) is the holder of the lease row
``gateway_usage_lease``, taken as the audit log's integrator takes its own: every replica
tries to take it when it has expired, its holder renews it every tick, and each change of
holder bumps ``epoch``. The row also keeps the cursor: the id (bigserial, insertion order) of
the last batch consumed. A tick locks the lease row, checks that this replica still holds it
at its epoch, reads the batches after the cursor, moves the cursor and deletes them, all in
one transaction; only after it commits does it hand them to its monitor
(``Monitor.score_usage``). So a takeover resumes at the cursor, and no batch is scored twice
(a scorer that dies between the commit and the hand-over loses at most that tick's batches).

Ids are taken in insertion order but commits can finish out of order; so an insert holds a
shared advisory lock and a scorer's read an exclusive one: when the scorer reads, every batch
with a smaller id has committed or rolled back, and none can appear behind the cursor.

**Bound on delay**: a row is scored at most ``interval_s`` (sink) + ``tick_s`` (scorer) after
its request while the database and a scorer are up; after a scorer dies, at most
``lease_s`` more (the lease expiring). The table holds what no scorer consumed yet (all
replicas down but their sinks' last inserts): the next scorer starts with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from typing import Any

import orjson
import psycopg
from psycopg import conninfo

from gateway.db import DatabaseUnavailable, connect, redact
from gateway.state._host import encode_usage
from gateway.state._hub import usage_batch
from gateway.state._usage import BatchingSink, Usage, UsageHandler

log = logging.getLogger("gateway.state")

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_usage (
    id BIGSERIAL PRIMARY KEY,
    member TEXT NOT NULL,
    header BYTEA NOT NULL,
    data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_usage_lease (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    holder TEXT NOT NULL DEFAULT '',
    epoch BIGINT NOT NULL DEFAULT 0,
    expires TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    consumed BIGINT NOT NULL DEFAULT 0);
INSERT INTO gateway_usage_lease (one) VALUES (TRUE) ON CONFLICT DO NOTHING
"""
#: Inserts hold it shared, the scorer's read exclusive (module doc).
_ORDER_LOCK = "SELECT pg_advisory_xact_lock{}(hashtext('gateway_usage'))"
_INSERT = "INSERT INTO gateway_usage (member, header, data) VALUES (%s, %s, %s)"
_TAKE_LEASE = """
UPDATE gateway_usage_lease
   SET epoch = CASE WHEN holder = %(me)s AND expires > now() THEN epoch ELSE epoch + 1 END,
       holder = %(me)s,
       expires = now() + make_interval(secs => %(ttl)s)
 WHERE holder = %(me)s OR expires <= now()
RETURNING epoch"""
_HELD = ("SELECT consumed FROM gateway_usage_lease WHERE holder = %s AND epoch = %s "
         "AND expires > now() FOR UPDATE")
_READ = ("SELECT id, member, header, data FROM gateway_usage WHERE id > %s ORDER BY id "
         "LIMIT %s")
_CONSUME = ("UPDATE gateway_usage_lease SET consumed = %s;"
            "DELETE FROM gateway_usage WHERE id <= %s")
_RELEASE = ("UPDATE gateway_usage_lease SET expires = '-infinity' "
            "WHERE holder = %s AND epoch = %s")


def _bounded(dsn: str, timeout: float) -> str:
    """``dsn`` whose connection attempts give up after ``timeout`` (unless it says otherwise)."""
    params = conninfo.conninfo_to_dict(dsn)
    params.setdefault("connect_timeout", max(1, round(timeout)))
    return conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


def _create(conn: psycopg.Connection) -> None:
    # Concurrent CREATE TABLE IF NOT EXISTS can collide: one at a time.
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway_usage_schema'))")
        for statement in SCHEMA.split(";"):
            conn.execute(statement)


class _Link:
    """One connection to the usage tables: opened on first use (bounded by ``timeout``, the
    tables created if absent), dropped when broken so the next use opens a fresh one."""

    def __init__(self, dsn: str, name: str, timeout: float, *, synchronous: bool) -> None:
        self.dsn = dsn
        self._name = name
        self._timeout = timeout
        self._synchronous = synchronous
        #: The open connection, if any.
        self.current: psycopg.Connection | None = None

    def get(self) -> psycopg.Connection:
        if self.current is None or self.current.closed:
            conn = connect(_bounded(self.dsn, self._timeout), name=self._name)
            try:
                conn.execute(f"SET statement_timeout = {int(self._timeout * 1000)}")
                if not self._synchronous:
                    # Usage is not a record: losing the last moments' rows to a database
                    # crash only leaves them unscored.
                    conn.execute("SET synchronous_commit = off")
                _create(conn)
            except BaseException:
                conn.close()
                raise
            self.current = conn
        return self.current

    def broken(self) -> None:
        if self.current is not None:
            with contextlib.suppress(Exception):
                self.current.close()
            self.current = None


class PgUsageSink(BatchingSink):
    """A replica's side: :class:`~gateway.state.UsageSink` into ``gateway_usage``."""

    target = "PostgreSQL"
    failures = (psycopg.Error, DatabaseUnavailable, OSError)

    def __init__(self, dsn: str, member: str, *, timeout: float, max_backlog: int = 4096,
                 interval_s: float = 0.05) -> None:
        super().__init__(max_backlog=max_backlog, interval_s=interval_s,
                         thread_name="state-pgusage")
        self._member = member
        self._timeout = timeout
        self._link = _Link(dsn, f"gateway-usage {member}", timeout, synchronous=False)
        self.target = f"PostgreSQL at {redact(dsn)}"
        #: Requests written to the table.
        self.written = 0
        self._down_until = 0.0

    def _send(self, batch: list[Usage]) -> None:
        header, blobs = encode_usage(batch)
        header["_b"] = [len(b) for b in blobs]
        try:
            if time.monotonic() < self._down_until:  # no connection attempt per batch
                raise DatabaseUnavailable("unreachable moments ago")
            conn = self._link.get()
            with conn.transaction():
                conn.execute(_ORDER_LOCK.format("_shared"))
                conn.execute(_INSERT, (self._member, orjson.dumps(header), b"".join(blobs)))
        except self.failures:
            if not self._failing or time.monotonic() >= self._down_until:
                self._down_until = time.monotonic() + self._timeout
            self._link.broken()
            raise
        self.written += len(batch)

    def close(self) -> None:
        super().close()
        self._link.broken()


class PgUsageScorer:
    """One replica's candidacy for scoring every replica's usage (module doc)."""

    def __init__(self, dsn: str, member: str, handler: UsageHandler, *, lease_s: float = 5.0,
                 tick_s: float = 0.1, timeout: float = 2.0, max_batches: int = 256) -> None:
        self.member = member
        #: Unique per process: the lease names its holder by it.
        self.me = f"{member} pid {os.getpid()} {secrets.token_hex(4)}"
        self._handler = handler
        self._lease_s = lease_s
        self._tick = min(tick_s, lease_s / 3)
        self._timeout = timeout
        self._max_batches = max_batches
        self._link = _Link(dsn, f"gateway-usage-scorer {member}", timeout, synchronous=True)
        self._profiles: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The lease epoch while this replica is the scorer, else None.
        self.epoch: int | None = None
        #: Batches (rows of the table) consumed and handed over by this replica.
        self.batches = 0
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="state-pgusage-scorer",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pause = self._tick
            try:
                if self.tick():
                    pause = 0.0  # more batches wait: no pause
                if self._failing:
                    log.warning("usage scorer: PostgreSQL reachable again")
                self._failing = False
            except (psycopg.Error, DatabaseUnavailable, OSError) as err:
                self._link.broken()
                self.epoch = None
                pause = max(self._tick, min(self._timeout, self._lease_s / 3))  # no busy retry
                if not self._failing:
                    log.warning("usage scorer: PostgreSQL at %s unreachable: %s",
                                redact(self._link.dsn), str(err).strip())
                self._failing = True
            except Exception:  # the loop must outlive any one failure
                log.exception("usage scorer: tick failed")
            if pause:
                self._stop.wait(pause)

    def tick(self) -> bool:
        """Take or renew the lease; as its holder consume and hand over what follows the
        cursor. True when more batches are waiting (the next tick should not wait)."""
        conn = self._link.get()
        row = conn.execute(_TAKE_LEASE, {"me": self.me, "ttl": self._lease_s}).fetchone()
        epoch = int(row[0]) if row is not None else None
        if epoch != self.epoch:
            if epoch is not None:
                log.warning("usage scorer: %s (lease epoch %d)", self.me, epoch)
            self.epoch = epoch
        if epoch is None:
            return False
        with conn.transaction():
            held = conn.execute(_HELD, (self.me, epoch)).fetchone()
            if held is None:  # fenced: another replica took over since we renewed
                self.epoch = None
                return False
            conn.execute(_ORDER_LOCK.format(""))
            rows = conn.execute(_READ, (int(held[0]), self._max_batches)).fetchall()
            if rows:
                last = int(rows[-1][0])
                for statement in _CONSUME.split(";"):
                    conn.execute(statement, (last,))
        for _id, member, header, data in rows:
            try:
                batch = self._decode(bytes(header), bytes(data))
            except (ValueError, TypeError, KeyError, IndexError) as err:
                log.warning("usage scorer: batch %d from %s refused: %r", _id, member, err)
                continue
            self.batches += 1
            try:
                self._handler(str(member), batch)
            except Exception:
                log.exception("usage scorer: usage handler failed")
        return len(rows) >= self._max_batches

    def _decode(self, header_bytes: bytes, data: bytes) -> list[Usage]:
        h: dict[str, Any] = orjson.loads(header_bytes)
        blobs, at, view = [], 0, memoryview(data)
        for size in h["_b"]:
            blobs.append(view[at:at + int(size)])
            at += int(size)
        if at != len(data):
            raise ValueError("usage batch attachments do not match their lengths")
        return usage_batch(h, blobs, self._profiles)

    def close(self) -> None:
        """Stop; give the lease up so another replica takes over at its next tick."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        conn = self._link.current
        if conn is not None and self.epoch is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                conn.execute(_RELEASE, (self.me, self.epoch))
        self.epoch = None
        self._link.broken()
