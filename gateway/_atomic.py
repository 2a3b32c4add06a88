"""Atomic, durable file replacement: the one way the gateway writes a file others may read.

A reader (a gateway re-reading its certificate, a watcher reloading the policy, an auditor
reading a checkpoint) sees the old file or the new one, never half of one; after a crash the
new file is there whole or not at all.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path


def write_atomic(path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (bytes, or an iterable of chunks for large files).

    The temporary file beside ``path`` is created with its final ``mode`` (a private key is
    never readable by others, not even for a moment), fsync'd, renamed over ``path``, and the
    directory fsync'd so the rename itself is durable.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; the file's must not be
        with os.fdopen(fd, "wb") as out:
            for chunk in ((data,) if isinstance(data, (bytes, bytearray, memoryview)) else data):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (created, renamed or removed files) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(directory: Path) -> None:
    """Create ``directory`` and any missing parents as 0700, whatever the umask.

    ``Path.mkdir(mode=...)`` is filtered by the umask, and with ``parents=True`` it applies
    ``mode`` only to the last directory; a directory holding keys, certificates or the audit
    log must never be group- or world-accessible, not even for a moment, so each one is
    created 0700 and chmod'ed to it before anything goes in. Existing ones are left as they are.
    """
    directory = Path(directory)
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # created meanwhile by someone else: theirs to decide
        os.chmod(path, 0o700)
