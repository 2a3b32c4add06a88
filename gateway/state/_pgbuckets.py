"""The ``postgresql`` backend's buckets: one row per key, leased with one UPDATE ... RETURNING.

Table ``gateway_bucket (key, tokens, at)``, created if absent. A lease refills the
row from the time of its last update (``rate * (now() - at)``, capped at ``burst``), grants up
to ``want`` whole tokens if at least ``need`` are there, and records the time, all in one
statement on the row's latest version, so concurrent leases from many replicas never lose an
update. ``at`` only moves forward (``GREATEST``), so a statement that waited for another's
row lock never counts the same refill twice.

Leases are committed without waiting for the WAL flush (``synchronous_commit = off`` on
these connections): a bucket is not a record, and a database crash that loses the last
leases only hands those tokens out again (at most one lease per member per key).

The database unreachable: the lease raises :class:`~gateway.errors.StateUnavailable` (the quota
check fails closed, UNAVAILABLE), after at most ``timeout`` seconds; for ``timeout`` seconds
after a failure further leases fail at once instead of each waiting again; then the next one
tries the database again, through a pool that replaces broken connections by itself.
"""

from __future__ import annotations

import threading
import time

import psycopg
from psycopg_pool import PoolTimeout

from gateway.db import open_pool, redact
from gateway.errors import StateUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_bucket (
    key TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at TIMESTAMPTZ NOT NULL)
"""

# One statement: lock the row, compute its level and the grant on the row's latest version
# (FOR UPDATE re-reads a row another lease changed meanwhile), and write both.
_LEASE = """
WITH b AS (
    SELECT key, LEAST(%(burst)s::float8, tokens + %(rate)s::float8
                      * GREATEST(0, EXTRACT(EPOCH FROM now() - at))::float8) AS level
    FROM gateway_bucket WHERE key = %(key)s FOR UPDATE),
g AS (
    SELECT key, level,
           CASE WHEN level >= %(need)s THEN LEAST(%(want)s::float8, floor(level))
                ELSE 0 END AS granted
    FROM b)
UPDATE gateway_bucket t SET tokens = g.level - g.granted, at = GREATEST(t.at, now())
FROM g WHERE t.key = g.key
RETURNING g.granted, t.tokens
"""
_CREATE = ("INSERT INTO gateway_bucket (key, tokens, at) VALUES (%(key)s, %(burst)s, now()) "
           "ON CONFLICT (key) DO NOTHING")
_RELEASE = """
UPDATE gateway_bucket
SET tokens = LEAST(%(burst)s::float8, tokens + %(n)s + %(rate)s::float8
                   * GREATEST(0, EXTRACT(EPOCH FROM now() - at))::float8),
    at = GREATEST(at, now())
WHERE key = %(key)s
"""


class PgBucketStore:
    """Shared buckets in PostgreSQL, as :class:`~gateway.state._lease.BucketStore`."""

    def __init__(self, dsn: str, member: str, *, timeout: float) -> None:
        self._dsn = dsn
        self._timeout = timeout
        # No check per checkout (a round trip each): a broken connection is retried once.
        self._pool = open_pool(dsn, name=f"gateway-state {member}", min_size=1, max_size=4,
                               timeout=timeout, check=False)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._ready = False

    def _run(self, statement: str, params: dict[str, object]) -> tuple[float, float] | None:
        if time.monotonic() < self._down_until:
            raise StateUnavailable(f"PostgreSQL at {redact(self._dsn)} was unreachable moments "
                                   f"ago; quotas cannot be checked, so the call is refused")
        try:
            try:
                return self._once(statement, params)
            except psycopg.OperationalError:
                # A connection the server ended (a restart, pg_terminate_backend) fails its
                # next statement; the pool drops it: once more on a fresh one. A lease that
                # had committed before the connection broke is lost, which only refuses more.
                return self._once(statement, params)
        except (psycopg.OperationalError, PoolTimeout, OSError) as err:
            self._down_until = time.monotonic() + self._timeout
            raise StateUnavailable(f"PostgreSQL at {redact(self._dsn)} unreachable: "
                                   f"{str(err).strip()}; quotas cannot be checked, so the "
                                   f"call is refused") from None
        except psycopg.Error as err:
            raise StateUnavailable(f"PostgreSQL at {redact(self._dsn)} refused the quota "
                                   f"statement: {str(err).strip()}; the call is refused"
                                   ) from None

    def _once(self, statement: str, params: dict[str, object]) -> tuple[float, float] | None:
        with self._pool.connection() as conn:
            if not conn.autocommit:  # a connection new to us: set it up once
                conn.autocommit = True  # one statement, one round trip: no COMMIT after
                # A bucket is not a record: a lease needs no WAL flush before it is
                # used. A database crash may lose the last moments' leases, which only
                # hands those tokens out again (at most one lease per member per key).
                conn.execute("SET synchronous_commit = off")
            if not self._ready:
                # Concurrent CREATE TABLE IF NOT EXISTS can collide: one at a time.
                with self._lock, conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway_bucket'))")
                    conn.execute(SCHEMA)
                self._ready = True
            cur = conn.execute(statement, params)
            row = cur.fetchone() if cur.description else None
            if row is None and statement is _LEASE:
                conn.execute(_CREATE, params)
                row = conn.execute(statement, params).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    def lease(self, key: str, rate: float, burst: int, need: int,
              want: int) -> tuple[int, float]:
        row = self._run(_LEASE, {"key": key, "rate": rate, "burst": burst, "need": need,
                                 "want": want})
        if row is None:  # the row was dropped between insert and update: nothing granted
            return 0, 0.0
        return int(row[0]), row[1]

    def release(self, key: str, rate: float, burst: int, n: int) -> None:
        self._run(_RELEASE, {"key": key, "rate": rate, "burst": burst, "n": n})

    def close(self) -> None:
        self._pool.close()
