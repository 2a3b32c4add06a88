"""A scratch schema on the test PostgreSQL server for one benchmark."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tests.support.postgres import schema_dsn

#: The server: $GATEWAY_TEST_DSN, else the tests' default.
DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@contextlib.contextmanager
def scratch_schema(what: str) -> Iterator[str | None]:
    """Yield the DSN of a fresh schema, dropped afterwards; None (after saying why ``what``
    is skipped) when no server answers."""
    import psycopg

    server = os.environ.get("GATEWAY_TEST_DSN", DEFAULT_DSN)
    try:
        psycopg.connect(server, connect_timeout=5).close()
    except psycopg.Error as err:
        print(f"{what}: skipped, no PostgreSQL at {server!r}: {err}")
        yield None
        return
    schemas = schema_dsn(server, "bench", prefix="gwbench")
    try:
        yield next(schemas)
    finally:
        next(schemas, None)  # drops the schema
