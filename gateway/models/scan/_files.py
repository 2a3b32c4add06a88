"""Where a model's bytes come from, and whether an external-data location stays inside.

ONNX external data (onnx/docs/ExternalData.md) names a file by a ``location`` relative to
the model file's directory. ONNX Runtime follows symlinks and hard links when it opens that
file, and resolves locations of a model loaded from bytes against the working directory, so
the location is checked here lexically (no ``..``, not absolute, no backslash or NUL) and,
for files on disk, component by component with ``lstat`` (no symlink anywhere below the
model directory, a regular file, one link only).

When the caller passes the already-verified bytes (``files``), those bytes are scanned and
the disk is only ``lstat``-ed for links (metadata, never content), so what was verified is
what is scanned.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.models.scan._report import ScanReport

MODEL_FILE = "model.onnx"
_DRIVE = re.compile(r"^[A-Za-z]:")


def relative_location(location: str) -> tuple[str | None, str]:
    """Normalise an external-data location, or return (None, why it escapes the directory)."""
    if not location:
        return None, "is empty"
    if "\x00" in location or "\\" in location:
        return None, "contains a NUL or backslash"
    if location.startswith("/") or _DRIVE.match(location):
        return None, "is an absolute path"
    if ".." in location.split("/"):
        return None, "climbs out of the model directory with '..'"
    norm = posixpath.normpath(location)
    if norm in (".", "") or norm.startswith("../"):
        return None, "does not name a file inside the model directory"
    return norm, ""


@dataclass
class ExternalFile:
    """A file external data lives in: its size, and a way to read a slice of it."""

    rel: str
    size: int
    _data: bytes | None = None
    _fd: int | None = None

    def read(self, offset: int, length: int) -> bytes:
        if self._data is not None:
            return bytes(self._data[offset:offset + length])
        assert self._fd is not None
        return os.pread(self._fd, length, offset)


class Source:
    """The files of one model version directory, from a verified mapping or read from disk."""

    def __init__(self, root: Path, files: Mapping[str, bytes] | None, max_file_bytes: int,
                 report: ScanReport) -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.report = report
        self._files = ({posixpath.normpath(k): v for k, v in files.items()}
                       if files is not None else None)
        self._external: dict[str, ExternalFile | None] = {}
        self._fds: list[int] = []

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def model_bytes(self) -> bytes | None:
        """The model file's bytes, or None after recording why they cannot be used."""
        if self._files is not None:
            self._check_links(MODEL_FILE, "model-file-link", required=False)
            data = self._files.get(MODEL_FILE)
            if data is None:
                self.report.add("high", "model-missing", f"no {MODEL_FILE} among the given files")
                return None
            return data if self._size_ok(MODEL_FILE, len(data)) else None
        st = self._check_links(MODEL_FILE, "model-file-link", required=True)
        if st is None:
            return None
        if not self._size_ok(MODEL_FILE, st.st_size):
            return None
        fd = self._open(MODEL_FILE, st)
        if fd is None:
            return None
        try:
            return _read_all(fd, st.st_size)
        finally:
            os.close(fd)

    def external(self, location: str, tensor: str) -> ExternalFile | None:
        """The file behind one tensor's external-data location, or None (with a finding)."""
        rel, why = relative_location(location)
        if rel is None:
            self.report.add("high", "external-data-outside",
                            f"tensor {tensor!r}: external-data location {location!r} {why}")
            return None
        if rel in self._external:
            return self._external[rel]
        found = self._external_file(rel, tensor)
        self._external[rel] = found
        return found

    def _external_file(self, rel: str, tensor: str) -> ExternalFile | None:
        if self._files is not None:
            self._check_links(rel, "external-data", required=False)
            data = self._files.get(rel)
            if data is None:
                self.report.add("high", "external-data-missing",
                                f"tensor {tensor!r}: external-data file {rel!r} is not among the "
                                f"verified files of the model", rel)
                return None
            return ExternalFile(rel, len(data), _data=data) if self._size_ok(rel, len(data)) \
                else None
        st = self._check_links(rel, "external-data", required=True, tensor=tensor)
        if st is None or not self._size_ok(rel, st.st_size):
            return None
        fd = self._open(rel, st)
        if fd is None:
            return None
        self._fds.append(fd)
        return ExternalFile(rel, st.st_size, _fd=fd)

    def _size_ok(self, rel: str, size: int) -> bool:
        if size > self.max_file_bytes:
            self.report.add("high", "file-too-large",
                            f"{rel} is {size} bytes, over the limit of {self.max_file_bytes}", rel)
            return False
        return True

    def _open(self, rel: str, st: os.stat_result) -> int | None:
        """Open without following links and make sure it is the file that was lstat-ed."""
        try:
            fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            self.report.add("high", "external-data-missing", f"cannot open {rel}: {err}", rel)
            return None
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            self.report.add("high", "file-changed", f"{rel} changed while being scanned", rel)
            return None
        return fd

    def _check_links(self, rel: str, code: str, *, required: bool,
                     tensor: str | None = None) -> os.stat_result | None:
        """lstat every component of ``rel`` below the root; flag links and non-files.

        ``code`` is the finding prefix: ``model-file-link`` or ``external-data``
        (-symlink/-hardlink/-missing). Returns the final lstat result when it is usable.
        """
        what = f"tensor {tensor!r}: external-data file {rel!r}" if tensor else rel
        path = self.root
        parts = rel.split("/")
        for i, part in enumerate(parts):
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if required:
                    missing = "model-missing" if code == "model-file-link" else \
                        "external-data-missing"
                    self.report.add("high", missing, f"{what} does not exist", rel)
                return None
            except OSError as err:
                self.report.add("high", "external-data-missing", f"{what}: {err}", rel)
                return None
            last = i == len(parts) - 1
            if stat.S_ISLNK(st.st_mode):
                link = code if code == "model-file-link" else f"{code}-symlink"
                self.report.add("high", link,
                                f"{what}: {'/'.join(parts[:i + 1])} is a symbolic link "
                                f"(to {os.readlink(path)!r}); links may point outside the model "
                                f"directory", rel)
                return None
            if not last and not stat.S_ISDIR(st.st_mode):
                self.report.add("high", "external-data-missing",
                                f"{what}: {'/'.join(parts[:i + 1])} is not a directory", rel)
                return None
        if not stat.S_ISREG(st.st_mode):
            self.report.add("high", "external-data-missing", f"{what} is not a regular file", rel)
            return None
        if st.st_nlink > 1:
            inside = _links_inside(self.root, st)
            link = code if code == "model-file-link" else f"{code}-hardlink"
            if inside >= st.st_nlink:
                self.report.add("low", link, f"{what} has {st.st_nlink} hard links, all inside "
                                "the model directory", rel)
            else:
                self.report.add("high", link,
                                f"{what} has {st.st_nlink} hard links and only {inside} are inside "
                                "the model directory: it is shared with a file outside, which can "
                                "change it after the model was verified", rel)
                return None
        return st


def _links_inside(root: Path, st: os.stat_result) -> int:
    """How many names under ``root`` are the same inode as ``st`` (without following links)."""
    count = 0
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            try:
                other = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                count += 1
    return count


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
