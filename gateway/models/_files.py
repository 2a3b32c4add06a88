"""Reading a model version directory into memory, once, refusing anything odd.

The bytes read here are the bytes that are verified, scanned and handed to ONNX Runtime:
nothing re-reads the path afterwards, so swapping a file after verification cannot get
unverified bytes served.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gateway.errors import ModelUnavailable

#: The OMS signature bundle: signs the directory, so it is not part of the signed file set.
SIGNATURE_FILE = "model.sig"
#: Files stored encrypted at rest end in this suffix; they are decrypted into memory only.
ENCRYPTED_SUFFIX = ".enc"


def read_version_dir(directory: Path, *, max_bytes: int) -> tuple[dict[str, bytes], bytes | None]:
    """Return ``({relative POSIX name: bytes}, signature bundle or None)`` for ``directory``.

    Symbolic links, hard-linked files, special files and names that are not plain relative
    paths are refused: a model directory is untrusted input. Encrypted files are returned
    under their stored (``.enc``) name; decryption is the caller's next step.
    """
    files: dict[str, bytes] = {}
    signature: bytes | None = None
    total = 0
    root = directory
    try:
        root_stat = os.lstat(root)
    except OSError as err:
        raise ModelUnavailable(f"{directory}: cannot read model directory: {err.strerror}") from err
    if not stat.S_ISDIR(root_stat.st_mode):
        raise ModelUnavailable(f"{directory}: not a directory (symbolic links are refused)")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                raise ModelUnavailable(f"{directory}: {rel} is a symbolic link; refused")
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(path, root)).as_posix()
            data = _read_regular(path, rel, directory)
            total += len(data)
            if total > max_bytes:
                raise ModelUnavailable(
                    f"{directory}: model files exceed the {max_bytes}-byte limit")
            if rel == SIGNATURE_FILE:
                signature = data
            else:
                files[rel] = data
    return files, signature


def _read_regular(path: str, rel: str, directory: Path) -> bytes:
    # O_NONBLOCK: a FIFO planted in the directory must not hang the loader (it is then
    # refused as not a regular file).
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ModelUnavailable(f"{directory}: cannot open {rel}: {err.strerror} "
                               "(symbolic links are refused)") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelUnavailable(f"{directory}: {rel} is not a regular file; refused")
        if st.st_nlink != 1:
            raise ModelUnavailable(f"{directory}: {rel} has {st.st_nlink} hard links; refused "
                                   "(it could alias a file outside the model directory)")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
