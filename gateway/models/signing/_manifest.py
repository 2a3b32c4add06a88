"""The OMS "files" manifest: safe resource names, per-file SHA-256, and the difference report.

A manifest maps each file's path relative to the model directory (POSIX, ``/``-separated) to
the SHA-256 of its plaintext bytes. Names are checked lexically here, before any path is ever
built from them: a name that is absolute, empty, or has ``.``/``..``/empty components or a
backslash could make a verifier read outside the model or read one file under two names.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

#: The signature file's name; it is never part of the manifest it signs.
SIGNATURE_NAME = "model.sig"
ENCRYPTED_SUFFIX = ".enc"
_READ_SIZE = 8 << 20


class ManifestError(Exception):
    """A name or file in the model cannot be part of a manifest."""


def check_name(name: object, what: str = "resource name") -> str:
    """Return ``name`` if it is a safe relative POSIX path, else raise :class:`ManifestError`."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{what} {name!r} is not a non-empty string")
    if "\\" in name or "\x00" in name:
        raise ManifestError(f"{what} {name!r} contains a backslash or NUL")
    if name.startswith("/"):
        raise ManifestError(f"{what} {name!r} is absolute")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ManifestError(f"{what} {name!r} has an empty, '.' or '..' component")
    return name


def sort_key(name: str) -> list[str]:
    """Order of resources: by path components, as ``model_signing`` orders PurePosixPath."""
    return name.split("/")


def root_digest(resources: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the concatenated raw digests, in resource order (OMS subject digest)."""
    h = hashlib.sha256()
    for _, digest in resources:
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def digests_of_bytes(files: Mapping[str, bytes]) -> dict[str, str]:
    """Name -> SHA-256 hex for files already in memory (the names are checked too)."""
    return {check_name(name, "file name"): hashlib.sha256(data).hexdigest()
            for name, data in files.items()}


def walk(model_dir: Path) -> list[tuple[str, Path]]:
    """Every file of ``model_dir`` except ``model.sig``: (plaintext name, path), sorted.

    Refuses symlinks (to files or directories) and special files instead of following or
    skipping them, so nothing in the directory is silently left out of a manifest. ``X.enc``
    is listed under its plaintext name ``X``; having both ``X`` and ``X.enc`` is an error.
    """
    if model_dir.is_symlink() or not model_dir.is_dir():
        raise ManifestError(f"{model_dir}: not a directory")
    found: dict[str, Path] = {}
    pending = [(model_dir, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = prefix + entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise ManifestError(f"{rel}: symbolic links are refused in a model")
                if stat.S_ISDIR(mode):
                    pending.append((Path(entry.path), rel + "/"))
                    continue
                if not stat.S_ISREG(mode):
                    raise ManifestError(f"{rel}: not a regular file")
                if rel == SIGNATURE_NAME:
                    continue
                name = rel[: -len(ENCRYPTED_SUFFIX)] if rel.endswith(ENCRYPTED_SUFFIX) else rel
                check_name(name, "file name")
                if name in found:
                    raise ManifestError(f"{name}: present both encrypted and in plaintext")
                found[name] = Path(entry.path)
    return sorted(found.items(), key=lambda item: sort_key(item[0]))


def read_tree(model_dir: Path) -> dict[str, tuple[bytes, bool]]:
    """Every file of ``model_dir`` except ``model.sig``, read into memory through directory
    file descriptors: name -> (bytes, encrypted).

    Each component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a
    directory or file swapped for a symlink while we read fails instead of being followed.
    ``X.enc`` is returned under its plaintext name ``X`` with ``encrypted`` true.
    """
    # O_NONBLOCK: opening a FIFO planted in the model must not wait for a writer.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    out: dict[str, tuple[bytes, bool]] = {}
    try:
        root = os.open(model_dir, flags | os.O_DIRECTORY)
    except OSError as err:
        raise ManifestError(f"{model_dir}: not a directory (or a symlink): {err.strerror}"
                            ) from err
    pending = [(root, "")]
    try:
        while pending:
            dir_fd, prefix = pending.pop()
            try:
                for entry in sorted(os.listdir(dir_fd)):
                    rel = prefix + entry
                    try:
                        fd = os.open(entry, flags, dir_fd=dir_fd)
                    except OSError as err:
                        if err.errno == errno.ELOOP:
                            raise ManifestError(f"{rel}: symbolic links are refused in a model"
                                                ) from err
                        raise ManifestError(f"{rel}: cannot open: {err.strerror}") from err
                    mode = os.fstat(fd).st_mode
                    if stat.S_ISDIR(mode):
                        pending.append((fd, rel + "/"))
                        continue
                    with os.fdopen(fd, "rb") as f:
                        if not stat.S_ISREG(mode):
                            raise ManifestError(f"{rel}: not a regular file")
                        if rel == SIGNATURE_NAME:
                            continue
                        data = f.read()
                    encrypted = rel.endswith(ENCRYPTED_SUFFIX)
                    name = check_name(rel[: -len(ENCRYPTED_SUFFIX)] if encrypted else rel,
                                      "file name")
                    if name in out:
                        raise ManifestError(f"{name}: present both encrypted and in plaintext")
                    out[name] = (data, encrypted)
            finally:
                os.close(dir_fd)
    finally:
        for fd, _ in pending:
            os.close(fd)
    return out


def _plain_chunks(path: Path) -> Iterator[memoryview]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        buf = bytearray(_READ_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            yield view[:n]


def chunks_of(path: Path, kek: bytes | None) -> Iterator[bytes | memoryview]:
    """The plaintext of ``path`` in pieces, decrypting ``*.enc`` in memory with ``kek``."""
    if path.name.endswith(ENCRYPTED_SUFFIX):
        if kek is None:
            raise ManifestError(f"{path.name}: encrypted; a key-encryption key is needed")
        from gateway.models.encryption import iter_decrypt_file

        return iter_decrypt_file(path, kek)
    return _plain_chunks(path)


def digests_of_tree(files: list[tuple[str, Path]], kek: bytes | None,
                    on_bytes: Callable[[int], None] | None = None) -> dict[str, str]:
    """Name -> SHA-256 hex, hashing files in parallel threads (hashlib releases the GIL)."""
    lock = threading.Lock()

    def one(path: Path) -> str:
        h = hashlib.sha256()
        for piece in chunks_of(path, kek):
            h.update(piece)
            if on_bytes is not None:
                with lock:
                    on_bytes(len(piece))
        return h.hexdigest()

    workers = max(1, min(len(files), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(one, [path for _, path in files])
        return dict(zip((name for name, _ in files), digests, strict=True))


def differences(expected: Mapping[str, str], actual: Mapping[str, str],
                ignored_by_signer: Iterable[str] = ()) -> list[str]:
    """Human lines naming files that are extra, missing or changed (empty if they agree)."""
    ignored = [p for p in ignored_by_signer if p != SIGNATURE_NAME]

    def ignored_note(name: str) -> str:
        covered = any(name == p or name.startswith(p + "/") for p in ignored)
        return " (listed in the signature's ignore_paths)" if covered else ""

    lines = []
    extra = sorted(set(actual) - set(expected), key=sort_key)
    if extra:
        lines.append("unsigned files present (the gateway serves only signed files): "
                     + ", ".join(name + ignored_note(name) for name in extra))
    missing = sorted(set(expected) - set(actual), key=sort_key)
    if missing:
        lines.append("signed files missing: " + ", ".join(missing))
    changed = sorted((n for n in set(expected) & set(actual) if expected[n] != actual[n]),
                     key=sort_key)
    if changed:
        lines.append("files changed since signing: " + ", ".join(changed))
    return lines
