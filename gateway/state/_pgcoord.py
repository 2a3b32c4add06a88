"""Desired state in PostgreSQL: a change every replica applies before the call that made it returns.

    coordinator = PgCoordinator(dsn, member="gw-a:8443")
    coordinator.subscribe("models", handler)        # applies the stored state, then follows it
    answers = coordinator.apply_everywhere("models", "demo-mlp/1", {"op": "load"}, timeout=30)

Tables (created if absent, in the schema the DSN's ``search_path`` names):

``gateway_state_desired (topic, key, version, payload, updated_at, updated_by)``
    The desired payload (JSON object) of every key; ``version`` comes from one sequence and
    is new with every change, so "has this member applied it" is one comparison.
``gateway_state_member (topic, member, heartbeat, incarnation)``
    Who follows which topic. Each member refreshes ``heartbeat`` every
    ``heartbeat_seconds`` (by the database clock, so replicas' clocks need not agree); it is
    *live* while its heartbeat is younger than ``live_seconds``. A member that closes
    deletes its rows; one that dies leaves them to lapse. Member names must be unique: a
    member that finds its name live in another process (``incarnation`` differs, its
    heartbeat still advancing) refuses to subscribe (ConfigError), since two processes
    answering under one name would hide each other's refusals. A predecessor that died is
    taken over once its heartbeat has stopped for two intervals.
``gateway_state_ack (topic, key, member, version, ok, detail, at)``
    Each member's answer for the newest version of each key it applied.

A change and an answer are announced with ``NOTIFY`` on a channel named after the schema;
members LISTEN, and also compare versions every ``poll_seconds`` (the backstop for a
notification sent while a member's connection was down).

What :meth:`PgCoordinator.apply_everywhere` waits for: every member live when the change was
stored, until it answers with that version or a newer one (a newer change to the same key
supersedes it: the answer is about the newer one), its heartbeat lapses (named, ``ok=False``,
without waiting out the timeout), or the timeout. A member that starts later applies the
change when it subscribes.

The database unreachable: :meth:`~PgCoordinator.apply_everywhere` and
:meth:`~PgCoordinator.subscribe` raise :class:`gateway.db.DatabaseUnavailable`
(UNAVAILABLE). A change may have been stored just before the connection broke; applying it
again is harmless, as it is what the caller asked for. Members keep what they applied, stop
heartbeating (so the others stop waiting for them), and on reconnecting apply whatever changed
meanwhile and send the answers they could not.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from gateway.db import DatabaseUnavailable, connect, open_pool, redact
from gateway.errors import ConfigError
from gateway.state._types import Applied, Handler

__all__ = ["PgCoordinator"]

log = logging.getLogger("gateway.state")

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS gateway_state_version;
CREATE TABLE IF NOT EXISTS gateway_state_desired (
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    version BIGINT NOT NULL,
    payload JSONB NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_by TEXT NOT NULL,
    PRIMARY KEY (topic, key));
CREATE TABLE IF NOT EXISTS gateway_state_member (
    topic TEXT NOT NULL,
    member TEXT NOT NULL,
    heartbeat TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    incarnation TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (topic, member));
CREATE TABLE IF NOT EXISTS gateway_state_ack (
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    version BIGINT NOT NULL,
    ok BOOLEAN NOT NULL,
    detail TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, key, member));
"""

#: The NOTIFY channel of the schema the tables resolve to (one deployment per schema).
_CHANNEL = """SELECT left('gateway_state.' || n.nspname, 63) FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = 'gateway_state_desired'::regclass"""
#: Notification payloads: a desired state changed; a member answered.
_CHANGE, _ACK = "change", "ack"
#: Longest answer text stored (a handler's error message).
_MAX_DETAIL = 2000
#: Longest wait between reconnection attempts, seconds.
_MAX_BACKOFF = 5.0
#: Rows of members not heard from for this long are removed when a member subscribes.
_FORGET_SECONDS = 86400


class PgCoordinator:
    """The PostgreSQL :class:`~gateway.state.Coordinator` (module docstring).

    Handlers run one at a time, in a thread of this coordinator (in the caller's thread
    during :meth:`subscribe`), never concurrently with each other.
    """

    def __init__(self, dsn: str, member: str, *, heartbeat_seconds: float = 1.0,
                 live_seconds: float = 5.0, poll_seconds: float = 2.0) -> None:
        if not member:
            raise ValueError("a coordinator member needs a name")
        if not 0 < heartbeat_seconds < live_seconds:
            raise ValueError("heartbeat_seconds must be positive and below live_seconds")
        self.member = member
        self.dsn = dsn
        self._heartbeat = heartbeat_seconds
        self._live = live_seconds
        self._poll = poll_seconds
        self._name = f"gateway-state {member}"
        self._incarnation = secrets.token_hex(8)
        self._handlers: dict[str, Handler] = {}
        self._applied: dict[tuple[str, str], int] = {}
        #: Answers applied but not yet written (the database was unreachable).
        self._unsent: dict[tuple[str, str], tuple[int, bool, str]] = {}
        self._apply_lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._up = True
        self._pool = open_pool(dsn, name=self._name, min_size=1, max_size=2)
        try:
            self._channel = self._create_tables()
        except BaseException:
            self._pool.close()
            raise

    # -- the Coordinator protocol ------------------------------------------------------------

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Follow ``topic``: apply its stored desired state now (in this thread), then every
        change. DatabaseUnavailable if the stored state cannot be read: a member that cannot
        learn what it must apply does not start as if there were nothing."""
        with self._apply_lock:
            if topic in self._handlers:
                raise ValueError(f"already subscribed to {topic!r}")
            self._handlers[topic] = handler
        try:
            with self._pool.connection() as conn:
                conn.execute("DELETE FROM gateway_state_member WHERE heartbeat < "
                             "clock_timestamp() - make_interval(secs => %s)", (_FORGET_SECONDS,))
            self._claim(topic)
            self._sync([topic])
        except (psycopg.Error, OSError) as err:
            with self._apply_lock:
                del self._handlers[topic]
            raise self._unavailable(err) from None
        except (DatabaseUnavailable, ConfigError):
            with self._apply_lock:
                del self._handlers[topic]
            raise
        if not self._threads:
            self._threads = [threading.Thread(target=target, name=f"{self._name} {what}",
                                              daemon=True)
                             for what, target in (("listen", self._listen),
                                                  ("apply", self._apply_loop))]
            for thread in self._threads:
                thread.start()

    def apply_everywhere(self, topic: str, key: str, payload: Mapping[str, object],
                         timeout: float) -> list[Applied]:
        """Store ``payload`` as ``key``'s desired state and wait for the live members'
        answers (module docstring); one :class:`Applied` per member, sorted by member."""
        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            conn = connect(self.dsn, name=f"{self._name} apply")
        except DatabaseUnavailable as err:
            raise self._unavailable(err) from None
        try:
            with conn:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                with conn.transaction():
                    row = conn.execute(
                        "INSERT INTO gateway_state_desired (topic, key, version, payload, "
                        "updated_by) VALUES (%s, %s, nextval('gateway_state_version'), %s, %s) "
                        "ON CONFLICT (topic, key) DO UPDATE SET version = EXCLUDED.version, "
                        "payload = EXCLUDED.payload, updated_by = EXCLUDED.updated_by, "
                        "updated_at = clock_timestamp() RETURNING version",
                        (topic, key, Jsonb(dict(payload)), self.member)).fetchone()
                    assert row is not None  # INSERT ... RETURNING returns its row
                    version = int(row[0])
                    live = [m for (m,) in conn.execute(
                        "SELECT member FROM gateway_state_member WHERE topic = %s AND "
                        "heartbeat > clock_timestamp() - make_interval(secs => %s)",
                        (topic, self._live))]
                    conn.execute("SELECT pg_notify(%s, %s)", (self._channel, _CHANGE))
                if topic in self._handlers and self.member not in live:
                    # This member is alive (it is asking) even if its heartbeat has not
                    # caught up after an outage: its caller relies on its answer.
                    live.append(self.member)
                return self._answers(conn, topic, key, version, live, deadline, timeout)
        except (psycopg.Error, OSError) as err:
            raise self._unavailable(err) from None

    def close(self) -> None:
        """Stop following; remove this member's rows (others stop expecting its answers)."""
        self._stop.set()
        self._dirty.set()
        for thread in self._threads:
            thread.join(timeout=10)
        try:
            with self._pool.connection() as conn:
                conn.execute("DELETE FROM gateway_state_member WHERE member = %s AND "
                             "incarnation = %s", (self.member, self._incarnation))
        except (psycopg.Error, OSError) as err:
            log.warning("coordinator member %s not removed: %s (its rows lapse)", self.member,
                        str(err).strip())
        self._pool.close()

    # -- status ----------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether the last attempt to reach the database succeeded."""
        return self._up

    def _unavailable(self, err: BaseException) -> DatabaseUnavailable:
        if isinstance(err, DatabaseUnavailable):
            self._mark(False, str(err))
            return err
        message = f"PostgreSQL at {redact(self.dsn)} unreachable: {str(err).strip()}"
        self._mark(False, message)
        return DatabaseUnavailable(message)

    def _mark(self, up: bool, error: str = "") -> None:
        was, self._up = self._up, up
        if was and not up:
            log.error("shared state lost: %s; this member keeps what it applied", error)
        elif up and not was:
            log.warning("shared state at %s reachable again", redact(self.dsn))

    # -- the waiting caller ----------------------------------------------------------------

    def _answers(self, conn: psycopg.Connection, topic: str, key: str, version: int,
                 live: list[str], deadline: float, timeout: float) -> list[Applied]:
        answers: dict[str, Applied] = {}
        while True:
            pending = [m for m in live if m not in answers]
            for member, ok, detail in conn.execute(
                    "SELECT member, ok, detail FROM gateway_state_ack WHERE topic = %s AND "
                    "key = %s AND version >= %s AND member = ANY(%s)",
                    (topic, key, version, pending)):
                answers[member] = Applied(member, ok, detail)
            pending = [m for m in live if m not in answers]
            ages: dict[str, float] = dict(conn.execute(
                "SELECT member, extract(epoch FROM clock_timestamp() - heartbeat)::float8 "
                "FROM gateway_state_member WHERE topic = %s AND member = ANY(%s)",
                (topic, pending)).fetchall())
            for member in pending:
                age = ages.get(member)
                if age is None:
                    answers[member] = Applied(member, False, "left before it answered")
                elif age >= self._live:
                    answers[member] = Applied(member, False, f"stopped answering: no "
                                              f"heartbeat for {age:.0f} s")
            remaining = deadline - time.monotonic()
            if len(answers) == len(live) or remaining <= 0:
                break
            # Woken by an answer; at least every heartbeat, to notice a member that died.
            for _ in conn.notifies(timeout=min(remaining, self._heartbeat), stop_after=1):
                pass
        for member in live:
            answers.setdefault(member, Applied(member, False, f"no answer within "
                                               f"{timeout:g} s"))
        self._mark(True)
        return [answers[m] for m in sorted(answers)]

    # -- the member ------------------------------------------------------------------------

    def _create_tables(self) -> str:
        try:
            with self._pool.connection() as conn:
                # Two replicas starting at once must not race to create the same tables.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway_state_schema'))")
                conn.execute(SCHEMA)
                row = conn.execute(_CHANNEL).fetchone()
        except (psycopg.Error, OSError) as err:
            raise self._unavailable(err) from None
        assert row is not None  # the table was just created
        return str(row[0])

    def _claim(self, topic: str) -> None:
        """Register as ``topic``'s member, unless another live process goes by this name."""
        first: object = None
        until = 0.0
        while True:
            with self._pool.connection() as conn:
                row = conn.execute(
                    "SELECT heartbeat, incarnation, extract(epoch FROM clock_timestamp() - "
                    "heartbeat)::float8 FROM gateway_state_member WHERE topic = %s AND "
                    "member = %s", (topic, self.member)).fetchone()
                if row is None or row[1] == self._incarnation or row[2] >= self._live \
                        or (first is not None and time.monotonic() > until):
                    conn.execute("INSERT INTO gateway_state_member (topic, member, "
                                 "incarnation) VALUES (%s, %s, %s) ON CONFLICT (topic, member) "
                                 "DO UPDATE SET heartbeat = clock_timestamp(), "
                                 "incarnation = EXCLUDED.incarnation",
                                 (topic, self.member, self._incarnation))
                    return
            if first is None:
                first, until = row[0], time.monotonic() + 2 * self._heartbeat + 0.5
            elif row[0] != first:
                raise ConfigError(f"the member name {self.member!r} is in use by another live "
                                  f"process (its heartbeat advances): every replica needs an "
                                  f"[server] instance_id of its own")
            self._stop.wait(0.1)

    def _sync(self, topics: list[str] | None = None) -> None:
        """Apply every stored change this member has not applied; send the answers."""
        with self._apply_lock:
            topics = list(self._handlers) if topics is None else topics
            if not topics:
                return
            self._send_answers()
            with self._pool.connection() as conn:
                rows = conn.execute("SELECT topic, key, version, payload FROM "
                                    "gateway_state_desired WHERE topic = ANY(%s) "
                                    "ORDER BY version", (topics,)).fetchall()
            for topic, key, version, payload in rows:
                if self._applied.get((topic, key)) == version or self._stop.is_set():
                    continue
                error = self._apply(topic, key, payload)
                self._applied[(topic, key)] = version
                self._unsent[(topic, key)] = (version, error is None, error or "")
                self._send_answers()  # at once: a caller is waiting for it
            self._mark(True)

    def _apply(self, topic: str, key: str, payload: Any) -> str | None:
        if not isinstance(payload, dict):
            return f"the desired state of {topic}/{key} is not a JSON object; not applied"
        try:
            error = self._handlers[topic](key, payload)
        except Exception as err:  # a handler's bug must not stop this member following
            log.exception("applying %s %s failed", topic, key)
            return f"failed ({type(err).__name__}); the member's log has the details"
        return None if error is None else error[:_MAX_DETAIL]

    def _send_answers(self) -> None:
        if not self._unsent:
            return
        answers = dict(self._unsent)
        with self._pool.connection() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO gateway_state_ack (topic, key, member, version, ok, detail) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (topic, key, member) DO "
                    "UPDATE SET version = EXCLUDED.version, ok = EXCLUDED.ok, "
                    "detail = EXCLUDED.detail, at = clock_timestamp()",
                    [(topic, key, self.member, version, ok, detail)
                     for (topic, key), (version, ok, detail) in answers.items()])
            conn.execute("SELECT pg_notify(%s, %s)", (self._channel, _ACK))
        for k, answer in answers.items():
            if self._unsent.get(k) == answer:
                del self._unsent[k]

    def _apply_loop(self) -> None:
        """Apply changes when notified, and every ``poll_seconds`` regardless."""
        while not self._stop.is_set():
            self._dirty.wait(self._poll)
            self._dirty.clear()
            if self._stop.is_set():
                return
            try:
                self._sync()
            except (psycopg.Error, OSError) as err:
                self._unavailable(err)
            except Exception:  # keep following; the next pass retries
                log.exception("coordinator pass failed")

    def _listen(self) -> None:
        """LISTEN for changes; refresh this member's heartbeat; reconnect with backoff."""
        backoff = 0.1
        listener: psycopg.Connection | None = None
        beat = 0.0
        while not self._stop.is_set():
            try:
                if listener is None:
                    listener = connect(self.dsn, name=f"{self._name} listen")
                    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    backoff = 0.1
                    self._dirty.set()  # whatever changed while not listening
                now = time.monotonic()
                if now >= beat:
                    # An upsert: rows removed behind this member's back (a restored
                    # backup, pruning after a long outage) come back.
                    listener.execute("INSERT INTO gateway_state_member (topic, member, "
                                     "incarnation) SELECT unnest(%s::text[]), %s, %s "
                                     "ON CONFLICT (topic, member) "
                                     "DO UPDATE SET heartbeat = clock_timestamp()",
                                     (list(self._handlers), self.member, self._incarnation))
                    beat = now + self._heartbeat
                    self._mark(True)
                for notify in listener.notifies(timeout=max(beat - time.monotonic(), 0.01)):
                    if notify.payload == _CHANGE:
                        self._dirty.set()
                    break
            except (psycopg.Error, OSError, DatabaseUnavailable) as err:
                self._unavailable(err)
                if listener is not None:
                    listener.close()
                    listener = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        if listener is not None:
            listener.close()
