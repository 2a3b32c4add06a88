"""PostgreSQL connections for every backend that keeps state there (policy, audit, shared state).

    from gateway.db import connect, open_pool, resolve_dsn
    dsn = resolve_dsn(config.policy.dsn)            # the setting, else $GATEWAY_DSN
    pool = open_pool(dsn, name="gateway-policy")    # psycopg_pool.ConnectionPool, opened
    with pool.connection() as conn: ...
    listener = connect(dsn, name="gateway-policy listen")   # autocommit, for LISTEN

A DSN is a libpq connection string or URI (``host=127.0.0.1 user=postgres dbname=test`` or
``postgresql://postgres@127.0.0.1/test``). A schema other than ``public`` is chosen in the DSN
itself, as libpq allows: ``options=-csearch_path=gw`` (the tests use one fresh schema per run
that way). ``name`` becomes the connection's ``application_name``, so an operator can tell
the gateway's connections apart in ``pg_stat_activity`` (and end them to test reconnection).

Messages never show a password: :func:`redact` is what goes into errors and logs.
"""

from __future__ import annotations

import os

import grpc
import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool

from gateway.errors import GatewayError

#: The environment variable a DSN is taken from when the configuration names none.
DSN_ENV = "GATEWAY_DSN"
#: Seconds to wait for a connection (libpq connect_timeout, pool checkout): short, because a
#: caller that cannot reach the database must fail closed promptly, not hang.
CONNECT_TIMEOUT = 5


class DatabaseUnavailable(GatewayError):
    """PostgreSQL cannot be reached, or a statement failed for lack of it."""

    status = grpc.StatusCode.UNAVAILABLE


def resolve_dsn(configured: str = "") -> str:
    """The configured DSN, else ``$GATEWAY_DSN``; a clear error when neither is set."""
    dsn = configured or os.environ.get(DSN_ENV, "")
    if not dsn:
        raise DatabaseUnavailable(f"no PostgreSQL DSN: set it in the configuration, pass "
                                  f"--dsn, or set ${DSN_ENV}")
    return dsn


def redact(dsn: str) -> str:
    """The DSN as safe to print: the password (if any) replaced by ``***``."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = "***"  # noqa: S105 - a mask, not a password
    return conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


def _params(dsn: str, name: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    if name:
        params["application_name"] = name
    return conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


def connect(dsn: str, *, name: str = "", autocommit: bool = True) -> psycopg.Connection:
    """One dedicated connection (for LISTEN, or a CLI's single transaction).

    Raises :class:`DatabaseUnavailable` naming the (redacted) DSN and libpq's reason.
    """
    try:
        return psycopg.connect(_params(dsn, name), autocommit=autocommit)
    except psycopg.Error as err:
        raise DatabaseUnavailable(f"PostgreSQL at {redact(dsn)} unreachable: "
                                  f"{str(err).strip()}") from None


def open_pool(dsn: str, *, name: str = "", min_size: int = 1, max_size: int = 4,
              timeout: float = CONNECT_TIMEOUT, check: bool = True) -> ConnectionPool:
    """An opened connection pool that replaces broken connections by itself.

    ``check`` tests each connection as it leaves the pool, so a connection the server ended
    (a restart, ``pg_terminate_backend``) is replaced instead of failing the caller's first
    statement; it costs a round trip per checkout, so a caller whose statement may simply be
    retried once on a fresh connection passes ``check=False`` (the pool still discards a
    connection returned broken). Opening does not wait for the database: a pool opened while
    it is down fills up once it is back; :func:`check_reachable` is the explicit start-up check.
    """
    pool = ConnectionPool(_params(dsn, name), min_size=min_size, max_size=max_size,
                          timeout=timeout,
                          check=ConnectionPool.check_connection if check else None,
                          name=name or None, open=False)
    pool.open(wait=False)
    return pool


def check_reachable(pool: ConnectionPool, dsn: str) -> None:
    """Run ``SELECT 1`` through ``pool``; DatabaseUnavailable if it cannot."""
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, OSError) as err:  # PoolTimeout is a psycopg.Error
        raise DatabaseUnavailable(f"PostgreSQL at {redact(dsn)} unreachable: "
                                  f"{str(err).strip()}") from None
