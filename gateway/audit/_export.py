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

from gateway._atomic import fsync_dir
from gateway.audit._proof import Error, LogReader, checkpoint_size
from gateway.audit._store import CHECKPOINT, CHECKPOINTS, SEGMENTS
from gateway.audit._store import scan_segments as list_segments
from gateway.audit._verify import history_lines


def write_new(path: Path, data: bytes) -> None:
    """Write a new file (never replacing one) and make it durable."""
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
        raise Error(f"{dest} exists and is not empty")
    (dest / SEGMENTS).mkdir(parents=True, exist_ok=True)
    try:
        segments, _strays = list_segments(source)
        for n, (first, path) in enumerate(segments):
            if first >= size:
                break
            end = min(segments[n + 1][0], size) if n + 1 < len(segments) else size
            recs = reader.records(first, end)
            write_new(dest / SEGMENTS / path.name, b"".join(r + b"\n" for r in recs))
        history = [n for _line, n, _torn in history_lines(source)
                   if n is not None and checkpoint_size(n, None) is not None
                   and checkpoint_size(n) <= size]
        write_new(dest / CHECKPOINTS,
               b"".join(json.dumps(n, ensure_ascii=False).encode() + b"\n" for n in history))
        write_new(dest / CHECKPOINT, note.encode())
        if vkey_file is not None and vkey_file.exists():
            write_new(dest / "log.vkey", vkey_file.read_bytes())
        fsync_dir(dest / SEGMENTS)
        fsync_dir(dest)
    except BaseException:
        shutil.rmtree(dest / SEGMENTS, ignore_errors=True)
        raise
    return size
