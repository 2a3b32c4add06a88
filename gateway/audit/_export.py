"""Backup of a log directory up to its latest signed checkpoint (``gateway audit export``).

The backup holds exactly the records that checkpoint signs, the checkpoints up to it and the
verifier key, so ``gateway audit verify`` accepts it with no unsigned tail, and copying it back
as the log directory (gateway stopped) restores the log without losing or altering a record
the checkpoint covers. It is taken while the gateway runs: only complete, checkpointed records
are read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gateway.audit._proof import AuditToolError, LogReader, checkpoint_size
from gateway.audit._store import (
    CHECKPOINT,
    CHECKPOINTS,
    SEGMENTS,
    fsync_dir,
    list_segments,
    read_checkpoints,
    read_data,
    segment_name,
    split_records,
)


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def export_log(source: Path, dest: Path, vkey_file: Path | None = None) -> int:
    """Copy ``source`` up to its latest checkpoint into the new directory ``dest``; return size."""
    reader = LogReader(source)
    note = reader.checkpoint()
    size = checkpoint_size(note)
    if dest.exists() and any(dest.iterdir()):
        raise AuditToolError(f"{dest} exists and is not empty")
    (dest / SEGMENTS).mkdir(parents=True, exist_ok=True)
    try:
        copied = 0
        for first, path in list_segments(source):
            if first >= size:
                break
            recs, _ = split_records(read_data(path))
            recs = recs[:size - first]
            if first != copied:
                raise AuditToolError(f"segment {path.name} does not follow its predecessor")
            _write(dest / SEGMENTS / segment_name(first), b"".join(r + b"\n" for r in recs))
            copied += len(recs)
        if copied != size:
            raise AuditToolError(f"the log holds {copied} records, fewer than its checkpoint "
                                 f"of size {size}: it is damaged, run `gateway audit verify`")
        history = [n for n in read_checkpoints(source) if checkpoint_size(n) <= size]
        _write(dest / CHECKPOINTS,
               b"".join(json.dumps(n, ensure_ascii=False).encode() + b"\n" for n in history))
        _write(dest / CHECKPOINT, note.encode())
        if vkey_file is not None and vkey_file.exists():
            _write(dest / "log.vkey", vkey_file.read_bytes())
        fsync_dir(dest / SEGMENTS)
        fsync_dir(dest)
    except BaseException:
        shutil.rmtree(dest / SEGMENTS, ignore_errors=True)
        raise
    return size
