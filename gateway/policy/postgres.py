"""The policy in PostgreSQL: one policy for every replica, published in versions.

Tables (created by the first ``gateway policy push``; replicas only read):

``casbin_rule (id, ptype, v0 .. v5)``
    The current rules, in the layout of Casbin's SQLAlchemy adapter (``CasbinRule``:
    ``id`` serial key, seven ``VARCHAR(255)`` columns, unused trailing values NULL), so
    Casbin tools read and write them as they would for any Casbin application. One row per
    ``p`` or ``g`` line; rows in ``id`` order are the lines of policy.csv.
``gateway_policy_version (version, digest, published_at, published_by, comment)``
    One row per publication; ``digest`` is the policy digest of its model.conf and
    policy.csv (the one decisions name, as ``gateway policy check`` prints it).
``gateway_policy_file (version, path, content)``
    Every file of the published directory: model.conf, policy.csv as written (comments
    and line numbers kept), ``tests/*.yaml`` and whatever else it held.
``gateway_policy_change (seq)``
    A counter that statement triggers on the three tables above bump, and that they
    announce with ``NOTIFY`` on a channel named after the schema; the replicas' polling
    backstop reads only this counter.

A publication (:func:`publish`) replaces ``casbin_rule`` and adds a version in one
transaction: replicas see all of it or none of it.

What a replica installs: the model and test cases of the newest version, with the rules
that ``casbin_rule`` holds. ``casbin_rule`` is the authority for rules because it is what
Casbin tools edit. When its rows are exactly the rule lines of the version's policy.csv (the
normal case, also after a Casbin tool rewrote the same rules), the version's own policy.csv
is installed, so digests and ``policy.csv:N`` rule names match the pushed directory. When a
tool edited ``casbin_rule`` since, the version's policy.csv is edited to match
(:func:`merge_rows`: removed rules become comments, added rows are appended, every other line
keeps its number) and that is installed, after the same validation and the version's test
cases, exactly like a push; the reload record's trigger says so. Whatever fails is refused and the
last good policy stays live: a replica never falls open. To give such an edit a version of
its own, push the directory it came from.

A public module of its own (not re-exported by :mod:`gateway.policy`) so that a gateway
reading its policy from files never imports the PostgreSQL driver.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from gateway.db import DatabaseUnavailable, connect, open_pool, redact
from gateway.policy._source import MODEL_FILE, POLICY_FILE, PolicyError, Problem, split_fields
from gateway.policy._store import Bundle, ReloadResult

__all__ = ["SCHEMA", "PostgresSource", "bundle_of", "directory_files", "merge_rows",
           "publish", "render_row", "rule_rows"]

log = logging.getLogger("gateway.policy")

#: Values per casbin_rule row (v0 .. v5) and the width of each column.
_VALUES = 6
_WIDTH = 255
_COLUMNS = ("ptype", "v0", "v1", "v2", "v3", "v4", "v5")
#: Largest file a publication stores (policy.csv of 100k rules is ~5 MB).
_MAX_FILE = 64 * 1024 * 1024
#: Longest wait between reconnection attempts, seconds.
#: Longest a watcher waits for a notification before it looks at its stop flag again.
_STOP_SLICE = 0.5
_MAX_BACKOFF = 5.0

Row = tuple[str | None, ...]

SCHEMA = """
CREATE TABLE IF NOT EXISTS casbin_rule (
    id SERIAL PRIMARY KEY,
    ptype VARCHAR(255), v0 VARCHAR(255), v1 VARCHAR(255), v2 VARCHAR(255),
    v3 VARCHAR(255), v4 VARCHAR(255), v5 VARCHAR(255));
CREATE TABLE IF NOT EXISTS gateway_policy_version (
    version BIGINT PRIMARY KEY,
    digest TEXT NOT NULL,
    published_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_by TEXT NOT NULL DEFAULT current_user,
    comment TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS gateway_policy_file (
    version BIGINT NOT NULL REFERENCES gateway_policy_version ON DELETE CASCADE,
    path TEXT NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (version, path));
CREATE TABLE IF NOT EXISTS gateway_policy_change (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    seq BIGINT NOT NULL);
INSERT INTO gateway_policy_change VALUES (TRUE, 0) ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION gateway_policy_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('UPDATE %I.gateway_policy_change SET seq = seq + 1', TG_TABLE_SCHEMA);
    PERFORM pg_notify(left('gateway_policy.' || TG_TABLE_SCHEMA, 63), '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER gateway_policy_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON casbin_rule
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_policy_changed();
CREATE OR REPLACE TRIGGER gateway_policy_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON gateway_policy_version
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_policy_changed();
CREATE OR REPLACE TRIGGER gateway_policy_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON gateway_policy_file
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_policy_changed();
"""

#: The NOTIFY channel of the schema the policy tables resolve to (as the trigger names it).
_CHANNEL = """SELECT left('gateway_policy.' || n.nspname, 63) FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = 'gateway_policy_change'::regclass"""


# --- rows <-> policy.csv -------------------------------------------------------------------


def rule_rows(policy_csv: bytes) -> list[Row]:
    """The casbin_rule rows of a policy.csv: one per rule line, values as written, trailing
    columns NULL (what the adapter's ``save_policy_line`` stores). PolicyError (file:line)
    for a line the table cannot hold."""
    problems: list[Problem] = []
    rows = [row for number, raw in enumerate(io.BytesIO(policy_csv), 1)
            if (row := _row(raw, number, problems)) is not None]
    if problems:
        raise PolicyError(problems)
    return rows


def _row(raw: bytes, number: int, problems: list[Problem]) -> Row | None:
    """The row of one policy.csv line (None: blank, comment, or a problem, appended)."""
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
    except UnicodeDecodeError as err:
        problems.append(Problem(POLICY_FILE, number, f"not UTF-8 text ({err.reason})"))
        return None
    if not line or line[0] == "#":
        return None
    fields = split_fields(line)
    if isinstance(fields, str):
        problems.append(Problem(POLICY_FILE, number, fields))
        return None
    if len(fields) > 1 + _VALUES:
        problems.append(Problem(POLICY_FILE, number, f"casbin_rule holds at most {_VALUES} "
                                f"values after the rule type, this line has {len(fields) - 1}"))
        return None
    long = [f for f in fields if len(f) > _WIDTH]
    if long:
        problems.append(Problem(POLICY_FILE, number, f"a value of {len(long[0])} characters "
                                f"does not fit casbin_rule's VARCHAR({_WIDTH})"))
        return None
    return (*fields, *(None,) * (1 + _VALUES - len(fields)))


def render_row(row: Row) -> str:
    """One policy.csv line of a casbin_rule row, as Casbin's adapter reads it (``ptype,
    v0, ...`` up to the first NULL)."""
    values = []
    for value in row:
        if value is None:
            break
        values.append(value)
    return ", ".join(values)


def merge_rows(policy_csv: bytes, rows: list[Row]) -> bytes:
    """``policy_csv`` edited to hold exactly the rules ``rows`` hold (as a multiset).

    A line whose rule is still a row stays where it is, comments too, so the cases'
    ``rule: policy.csv:N`` references and the auditor's reading survive a Casbin tool's
    edit; a line whose rule is gone becomes a ``# removed in casbin_rule:`` comment (line
    numbers do not move); rows the text lacks are appended in ``id`` order. Unchanged rows
    give back ``policy_csv`` byte for byte (and so its digest)."""
    remaining = Counter(rows)
    out: list[bytes] = []
    ignored: list[Problem] = []  # a version's own text was checked when it was pushed
    for number, raw in enumerate(io.BytesIO(policy_csv), 1):
        row = _row(raw, number, ignored)
        if row is None or remaining[row] > 0:
            if row is not None:
                remaining[row] -= 1
            out.append(raw)
        else:
            newline = b"\n" if raw.endswith(b"\n") else b""
            out.append(b"# removed in casbin_rule: " + raw.strip() + newline)
    added = []
    for row in rows:
        if remaining[row] > 0:
            remaining[row] -= 1
            added.append(render_row(row).encode() + b"\n")
    if added and out and not out[-1].endswith(b"\n"):
        out.append(b"\n")
    return b"".join(out + added)


# --- publishing -----------------------------------------------------------------------------


def directory_files(directory: Path) -> dict[str, bytes]:
    """Every regular file under a policy directory by relative POSIX path (hidden names and
    symbolic links skipped): what a publication stores beside the rules."""
    files: dict[str, bytes] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or path.is_symlink() \
                or not path.is_file():
            continue
        if path.stat().st_size > _MAX_FILE:
            raise PolicyError(f"{path}: larger than {_MAX_FILE} bytes; not published")
        files[relative.as_posix()] = path.read_bytes()
    return files


def bundle_of(files: dict[str, bytes], label: str = "") -> Bundle:
    """The bundle a replica compiles from stored files: model.conf, policy.csv and the
    cases ``tests/*.yaml`` (as :func:`gateway.policy.case_files` finds them on disk)."""
    missing = [name for name in (MODEL_FILE, POLICY_FILE) if name not in files]
    if missing:
        raise PolicyError([Problem(name, 0, "missing from the published version")
                           for name in missing])
    cases = tuple((path, data) for path, data in sorted(files.items())
                  if path.count("/") == 1 and path.startswith("tests/")
                  and path.endswith((".yaml", ".yml")))
    return Bundle({MODEL_FILE: files[MODEL_FILE], POLICY_FILE: files[POLICY_FILE]}, cases,
                  label)


def publish(dsn: str, files: dict[str, bytes], *, comment: str = "") -> tuple[int, str]:
    """Publish a checked policy directory as the next version, atomically; returns
    (version, digest). Creates the tables on first use. The caller has compiled and tested
    ``files`` (``gateway policy push`` does, through the same code a replica uses)."""
    bundle = bundle_of(files)
    rows = rule_rows(bundle.files[POLICY_FILE])
    digest = bundle.digest
    try:
        with connect(dsn, name="gateway policy push", autocommit=False) as conn:
            # Publications are serialized (one version number each); readers never wait.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway_policy_publish'))")
            conn.execute(SCHEMA)
            version = _first(conn.execute("SELECT coalesce(max(version), 0) + 1 "
                                          "FROM gateway_policy_version"))
            conn.execute("INSERT INTO gateway_policy_version (version, digest, comment) "
                         "VALUES (%s, %s, %s)", (version, digest, comment))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO gateway_policy_file (version, path, content) "
                                "VALUES (%s, %s, %s)",
                                [(version, path, data) for path, data in files.items()])
                cur.execute("DELETE FROM casbin_rule")
                with cur.copy("COPY casbin_rule (ptype, v0, v1, v2, v3, v4, v5) "
                              "FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
    except psycopg.Error as err:
        raise DatabaseUnavailable(f"publishing to PostgreSQL at {redact(dsn)} failed: "
                                  f"{str(err).strip()}") from None
    return version, digest


# --- the replica's source ---------------------------------------------------------------------


class PostgresSource:
    """The policy source of a replica: reads the newest version, watches for new ones."""

    kind = "postgresql"

    def __init__(self, dsn: str, *, name: str = "gateway-policy") -> None:
        self.dsn = dsn
        self._name = name
        self._pool = open_pool(dsn, name=name, min_size=1, max_size=2)
        self._seq: int | None = None  # change counter as of the last read
        self._state_lock = threading.Lock()
        self._up = True
        self._error = ""

    # -- status ----------------------------------------------------------------------------

    def status(self) -> tuple[bool, str]:
        with self._state_lock:
            return self._up, self._error

    def _mark(self, up: bool, error: str = "") -> None:
        with self._state_lock:
            was = self._up
            self._up, self._error = up, error
        if was and not up:
            log.error("policy source lost: %s; the installed policy stays live", error)
        elif up and not was:
            log.warning("policy source %s reachable again", redact(self.dsn))

    def _unavailable(self, err: Exception) -> DatabaseUnavailable:
        message = f"PostgreSQL at {redact(self.dsn)} unreachable: {str(err).strip()}"
        self._mark(False, message)
        return DatabaseUnavailable(message)

    # -- reading ---------------------------------------------------------------------------

    def read(self) -> Bundle:
        """The newest version's model and cases with casbin_rule's rules (module docstring)."""
        try:
            with self._pool.connection() as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                seq = _first(conn.execute("SELECT seq FROM gateway_policy_change"))
                head = conn.execute("SELECT version, digest FROM gateway_policy_version "
                                    "ORDER BY version DESC LIMIT 1").fetchone()
                if head is None:
                    raise _nothing_published(self.dsn)
                version, digest = head
                files: dict[str, bytes] = dict(conn.execute(
                    "SELECT path, content FROM gateway_policy_file WHERE version = %s",
                    (version,)).fetchall())
                rows = conn.execute("SELECT ptype, v0, v1, v2, v3, v4, v5 FROM casbin_rule "
                                    "ORDER BY id").fetchall()
        except psycopg.errors.UndefinedTable:
            self._mark(True)
            raise _nothing_published(self.dsn) from None
        except (psycopg.Error, OSError) as err:
            raise self._unavailable(err) from None
        self._mark(True)
        self._seq = seq
        return _installable(version, digest, {p: bytes(c) for p, c in files.items()}, rows)

    def close(self) -> None:
        self._pool.close()

    # -- watching --------------------------------------------------------------------------

    def watch(self, stop: threading.Event, interval: float,
              reload: Callable[..., ReloadResult | None]) -> None:
        """LISTEN for the triggers' NOTIFY; every ``interval`` s without one, compare the
        change counter (the backstop for a lost notification). A lost connection marks the
        source down and is re-opened with backoff; the installed policy stays live."""
        backoff = 0.1
        listener: psycopg.Connection | None = None
        next_poll = time.monotonic() + interval
        while not stop.is_set():
            try:
                if listener is None:
                    listener = connect(self.dsn, name=f"{self._name} listen")
                    channel = _first(listener.execute(_CHANNEL))
                    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self._mark(True)
                    backoff = 0.1
                    trigger = "postgresql listen"  # whatever changed while not listening
                else:
                    # Waits in short slices, so `stop` is seen promptly (close() joins this
                    # thread) however long the polling backstop's interval is.
                    wait = max(0.0, min(next_poll - time.monotonic(), _STOP_SLICE))
                    notified = any(True for _ in listener.notifies(timeout=wait,
                                                                   stop_after=1))
                    trigger = "postgresql notify" if notified else "postgresql poll"
                    if not notified:
                        if time.monotonic() < next_poll:
                            continue
                        next_poll = time.monotonic() + interval
                        seq = listener.execute("SELECT seq FROM gateway_policy_change")
                        if _first(seq) == self._seq:
                            continue
                if not stop.is_set():
                    reload(trigger, if_changed=True)
            except (psycopg.Error, OSError, DatabaseUnavailable) as err:
                if not isinstance(err, DatabaseUnavailable):
                    self._unavailable(err)
                else:
                    self._mark(False, str(err))
                if listener is not None:
                    listener.close()
                    listener = None
                stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF, max(interval, 0.1))
        if listener is not None:
            listener.close()


def _first(cursor: psycopg.Cursor[Any]) -> Any:
    """The first column of a query that always returns one row (an aggregate, a one-row
    table): a missing row is a broken schema, not a value."""
    row = cursor.fetchone()
    if row is None:
        raise PolicyError("the policy tables are damaged: a one-row query returned no row")
    return row[0]


def _nothing_published(dsn: str) -> PolicyError:
    return PolicyError(f"no policy published in PostgreSQL at {redact(dsn)}: publish one "
                       "with `gateway policy push DIRECTORY --dsn ...`")


def _installable(version: int, digest: str, files: dict[str, bytes],
                 rows: list[Row]) -> Bundle:
    """The bundle of a version, with casbin_rule's rows as its rules (module docstring)."""
    label = f"postgresql version {version}"
    bundle = bundle_of(files, label)
    if bundle.digest != digest:
        raise PolicyError(f"{label}: its files have digest {bundle.digest}, not the "
                          f"{digest} recorded for it (written or altered behind `gateway "
                          "policy push`)")
    merged = merge_rows(bundle.files[POLICY_FILE], [tuple(row) for row in rows])
    if merged == bundle.files[POLICY_FILE]:
        return bundle
    return Bundle({MODEL_FILE: bundle.files[MODEL_FILE], POLICY_FILE: merged},
                  bundle.cases, f"{label} with casbin_rule edited since ({len(rows)} rows)")
