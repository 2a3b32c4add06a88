"""A scratch schema on a PostgreSQL server: the tests' and the benches' one way to get one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator


def schema_dsn(server: str, label: str, prefix: str = "gwtest") -> Iterator[str]:
    """Create a fresh schema, yield a DSN whose search_path is that schema, drop it after."""
    import psycopg
    from psycopg import conninfo, sql

    schema = f"{prefix}_{label}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield conninfo.make_conninfo(server, options=f"-csearch_path={schema}")
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
