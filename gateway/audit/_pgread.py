"""Reading the PostgreSQL audit log for the CLI: checkpoints, entries, proofs, export, verify.

    with PgLogReader(dsn) as reader:
        note = reader.checkpoint()                        # latest signed checkpoint
        proof = offline.prove_inclusion(reader, 42)       # the same rules as for a directory
        size = reader.export(Path("/backup/audit"), vkey_file)

It is a :class:`~gateway.audit._proof.LogReader` whose records and checkpoints come from the
tables (``_pgschema``), so proofs are made and checked by the very code that serves a log
directory. An export is a log directory, byte for byte what a file log of the same records
would hold (segments, ``checkpoints.jsonl``, ``checkpoint``, ``log.vkey``): the standalone
verifier checks it as it checks any other. ``verify`` is an export of everything (records
after the latest checkpoint too) into a temporary directory, verified there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from gateway._atomic import fsync_dir
from gateway.audit._export import write_new
from gateway.audit._pgschema import CHUNK
from gateway.audit._proof import Error, LogReader, checkpoint_size
from gateway.audit._store import CHECKPOINT, CHECKPOINTS, SEGMENTS, segment_name
from gateway.db import DatabaseUnavailable, connect, redact, resolve_dsn

#: Where an export keeps the verifier key (as ``offline.EXPORT_VKEY``).
EXPORT_VKEY = "log.vkey"


class PgLogReader(LogReader):
    """A read-only view of the log in PostgreSQL (one snapshot per call)."""

    def __init__(self, dsn: str = "") -> None:
        self.dsn = resolve_dsn(dsn)
        self.directory = Path(f"postgresql {redact(self.dsn)}")
        self._conn = connect(self.dsn, name="gateway audit (CLI)")
        try:
            self._one("SELECT 1 FROM gateway_audit_log")
        except psycopg.errors.UndefinedTable:
            self.close()
            raise Error(f"no audit log in PostgreSQL at {redact(self.dsn)} (no "
                        "gateway_audit_log table in the DSN's schema)") from None

    def _one(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            row = self._conn.execute(query, params).fetchone()
        except psycopg.errors.UndefinedTable:
            raise
        except psycopg.Error as err:
            raise DatabaseUnavailable(f"reading the audit log in PostgreSQL at "
                                      f"{redact(self.dsn)} failed: {str(err).strip()}") from None
        return row

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PgLogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what LogReader reads from a directory --------------------------------------------------

    def size(self) -> int:
        row = self._one("SELECT size FROM gateway_audit_log")
        return 0 if row is None else int(row[0])

    def records(self, start: int = 0, end: int | None = None) -> list[bytes]:
        end = self.size() if end is None else end
        out: list[bytes] = []
        for chunk in self._chunks(start, end):
            out.extend(chunk)
        if len(out) < end - start:
            raise Error(f"the log holds {start + len(out)} complete records; there is no "
                        f"record {start + len(out)}")
        return out

    def _chunks(self, start: int, end: int) -> Any:
        """Records ``[start, end)`` in chunks, stopping at a gap (the caller sees it short)."""
        while start < end:
            try:
                rows = self._conn.execute(
                    "SELECT seq, data FROM gateway_audit_record WHERE seq >= %s AND seq < %s "
                    "ORDER BY seq LIMIT %s", (start, end, CHUNK)).fetchall()
            except psycopg.Error as err:
                raise DatabaseUnavailable(f"reading the audit log in PostgreSQL at "
                                          f"{redact(self.dsn)} failed: "
                                          f"{str(err).strip()}") from None
            chunk: list[bytes] = []
            for seq, data in rows:
                if seq != start + len(chunk):
                    break
                chunk.append(bytes(data))
            if chunk:
                yield chunk
            if len(chunk) < len(rows) or not rows:
                return
            start += len(chunk)

    def checkpoints(self) -> list[str]:
        """Every stored checkpoint, oldest first."""
        try:
            rows = self._conn.execute("SELECT note FROM gateway_audit_checkpoint "
                                      "ORDER BY size").fetchall()
        except psycopg.Error as err:
            raise DatabaseUnavailable(f"reading the audit log in PostgreSQL at "
                                      f"{redact(self.dsn)} failed: {str(err).strip()}") from None
        return [str(r[0]) for r in rows]

    def checkpoint(self, size: int | None = None) -> str:
        if size is None:
            row = self._one("SELECT note FROM gateway_audit_checkpoint "
                            "ORDER BY size DESC LIMIT 1")
            if row is None:
                raise Error(f"{self.directory} has no signed checkpoint yet")
        else:
            row = self._one("SELECT note FROM gateway_audit_checkpoint WHERE size = %s",
                            (size,))
            if row is None:
                raise Error(f"the log signed no checkpoint of size {size}")
        return str(row[0])

    def vkey(self) -> str:
        """The verifier key the log's head row names (the key its replicas sign with)."""
        row = self._one("SELECT vkey FROM gateway_audit_log")
        return "" if row is None else str(row[0])

    # -- export ---------------------------------------------------------------------------------

    def export(self, dest: Path, vkey_file: Path | None = None, *, everything: bool = False,
               segment_bytes: int = 64 * 1024 * 1024) -> int:
        """Write the log as a log directory into the new directory ``dest``: records up to
        the latest checkpoint (``everything``: all of them), the checkpoints up to it, the
        latest as ``checkpoint``, and the verifier key (``vkey_file``, else the log's own).
        Returns the number of records written. One REPEATABLE READ snapshot throughout."""
        if dest.exists() and any(dest.iterdir()):
            raise Error(f"{dest} exists and is not empty")
        (dest / SEGMENTS).mkdir(parents=True, exist_ok=True)
        try:
            with self._conn.transaction():
                self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                notes = self.checkpoints()
                if not notes:
                    raise Error(f"{self.directory} has no signed checkpoint yet")
                latest = notes[-1]
                size = self.size() if everything else checkpoint_size(latest)
                written = self._write_segments(dest, size, segment_bytes)
                if written < size:
                    raise Error(f"the log holds {written} complete records; there is no "
                                f"record {written}")
                history = [n for n in notes if checkpoint_size(n, None) is not None
                           and checkpoint_size(n) <= max(size, checkpoint_size(latest))]
                write_new(dest / CHECKPOINTS, b"".join(
                    json.dumps(n, ensure_ascii=False).encode() + b"\n" for n in history))
                write_new(dest / CHECKPOINT, latest.encode())
                if vkey_file is not None and vkey_file.exists():
                    write_new(dest / EXPORT_VKEY, vkey_file.read_bytes())
                else:
                    write_new(dest / EXPORT_VKEY, self.vkey().encode() + b"\n")
            fsync_dir(dest / SEGMENTS)
            fsync_dir(dest)
        except BaseException:
            shutil.rmtree(dest / SEGMENTS, ignore_errors=True)
            for name in (CHECKPOINTS, CHECKPOINT, EXPORT_VKEY):
                (dest / name).unlink(missing_ok=True)
            raise
        return size

    def _write_segments(self, dest: Path, size: int, segment_bytes: int) -> int:
        first, length, written = 0, 0, 0
        parts: list[bytes] = []
        for chunk in self._chunks(0, size):
            for record in chunk:
                if parts and length + len(record) + 1 > segment_bytes:
                    write_new(dest / SEGMENTS / segment_name(first), b"".join(parts))
                    first, parts, length = written, [], 0
                parts.append(record + b"\n")
                length += len(record) + 1
                written += 1
        if parts:
            write_new(dest / SEGMENTS / segment_name(first), b"".join(parts))
        return written

    def snapshot(self) -> tempfile.TemporaryDirectory[str]:
        """Everything in the log (unsigned records too) as a temporary log directory, for
        ``verify``: the caller verifies ``Path(snapshot.name) / "log"`` and cleans it up."""
        tmp = tempfile.TemporaryDirectory(prefix="gateway-audit-pg-")
        self.export(Path(tmp.name) / "log", everything=True)
        return tmp
