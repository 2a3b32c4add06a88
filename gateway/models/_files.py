"""The one reader of a model version directory: every file once into memory, hashed as read.

Serving, ``gateway model sign|verify|scan``, the tests and the bench all read a model
directory through :func:`read_model_dir`, and everything after it (decryption, signature
verification, the admission scan, ONNX Runtime) works on its result: nothing re-reads a
path, so swapping a file after verification cannot get unverified bytes served, and no two
readers can disagree about what a directory holds.

A model directory is untrusted input. Every component is opened relative to its parent's
descriptor with ``O_NOFOLLOW``, so a symbolic link (even one swapped in while reading) is
refused instead of followed; hard-linked files (which could alias a file outside the model),
FIFOs, sockets and devices are refused; names must be plain relative POSIX names; the total
size is bounded.

Loading (``stage`` given), a plaintext file of at least ``STAGE_MIN_BYTES`` is not read into
a buffer but copied by the kernel (``sendfile``) from the descriptor opened here into a
private staging directory (:mod:`gateway.models._staging`), and hashed from a read-only
mapping of that copy while the copy proceeds. Its bytes in :class:`ModelDir` are a view of
that mapping: the copy is the file's verified bytes from then on, and ONNX Runtime maps it
(not the original, which anyone able to write the model directory could change).

What is left out, as ``model_signing`` leaves it out by default: the signature file and the
top-level git paths ``.git``, ``.gitattributes``, ``.github``, ``.gitignore``. They are never
opened, so they can never be loaded; a signature records them in its ignore paths.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import logging
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ModelUnavailable
from gateway.models._staging import STAGE_MIN_BYTES, Staging

#: The OMS signature bundle: signs the directory, so it is not part of the signed file set.
SIGNATURE_FILE = "model.sig"
#: Files stored encrypted at rest end in this suffix; they are decrypted into memory only.
ENCRYPTED_SUFFIX = ".enc"
#: ``model_signing``'s default ignore set (``ignore_git_paths``), relative to the model root.
IGNORED_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
#: Everything a signature leaves out, as recorded in its ``ignore_paths``.
SIGNATURE_IGNORE_PATHS = (SIGNATURE_FILE, *IGNORED_PATHS)
#: Default bound on all files of one version together.
DEFAULT_MAX_BYTES = 2 * 1024**3
_CHUNK = 8 << 20
#: Files larger than this are read by one thread while another hashes (see _read_hashing).
_PIPELINE = 64 << 20
#: Files opened and read in parallel at a time (bounds the open descriptors).
_BATCH = 64
#: A file's bytes: ``bytes``, or a read-only memoryview for large files (no copy).
FileData = bytes | memoryview
#: A file's SHA-256 (hex), or the future one of a staged file still being hashed.
_Digest = str | concurrent.futures.Future[str]
log = logging.getLogger(__name__)
#: Hashes the staged files, each following its copy (bounded: a model may have many).
_HASHERS = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1),
                                                 thread_name_prefix="model-hash")
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class ModelFilesError(ModelUnavailable):
    """The directory cannot be read as a model: a link, a special file, too large, unreadable.

    ``code`` is the admission scanner's finding code (``model-file-link``, ``file-too-large``,
    ``model-missing``, ``unreadable-file``). The message names files relative to the model
    directory only; the directory's path is in ``detail``.
    """

    def __init__(self, code: str, message: str, directory: Path | str) -> None:
        super().__init__(message, detail=f"{directory}: {message}")
        self.code = code


@dataclass(frozen=True)
class ModelDir:
    """A model version directory as read: the only source of its bytes from then on."""

    #: Stored name (relative POSIX path, ``X.enc`` for encrypted files) -> bytes (a
    #: read-only memoryview for large files).
    files: dict[str, FileData]
    #: Stored name -> hex SHA-256 of the stored bytes, computed while reading.
    digests: dict[str, str]
    #: The ``model.sig`` bundle, or None when the directory has none.
    signature: bytes | None
    #: Ignored top-level names present in the directory (never opened).
    ignored: tuple[str, ...] = ()
    directory: str = field(default="")
    #: Stored name -> size in bytes (also of files whose bytes were not kept).
    sizes: dict[str, int] = field(default_factory=dict)
    #: Stored name -> its name in the staging directory, for the files staged (their bytes
    #: in ``files`` are a read-only view of the staged copy).
    staged: dict[str, str] = field(default_factory=dict)
    #: Stored name -> the SHA-256 of a staged file still being hashed (read with
    #: ``defer_staged_hashes``); such a name is in ``files`` and ``sizes``, not ``digests``.
    pending: dict[str, concurrent.futures.Future[str]] = field(default_factory=dict)


def read_model_dir(directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   on_bytes: Callable[[int], object] | None = None,
                   keep_only: frozenset[str] | None = None,
                   stage: Staging | None = None,
                   defer_staged_hashes: bool = False) -> ModelDir:
    """Read every file of ``directory`` into memory once, hashing each as it is read.

    Files are read in parallel (reading and hashing release the GIL); a large file is read
    by one thread while another hashes the pieces already read. Raises
    :class:`ModelFilesError` naming the offending file. ``on_bytes`` is called with the
    size of each piece read (a progress bar). With ``keep_only`` the bytes of other plaintext
    files are hashed and dropped (signing and ``model verify`` need their digests and sizes
    only); the checks are the same. With ``stage``, large plaintext files are staged there
    (see the module docstring); the caller removes the staging directory. With
    ``defer_staged_hashes`` this returns once they are copied: their digests, still being
    computed, are in ``pending`` instead of ``digests``.
    """
    found: dict[str, tuple[FileData | None, _Digest]] = {}
    staged: dict[str, str] = {}
    sizes: dict[str, int] = {}
    ignored: list[str] = []
    batch: list[tuple[int, int, str]] = []
    total = 0
    try:
        root = os.open(directory, _FLAGS | os.O_DIRECTORY)
    except OSError as err:
        code = {errno.ENOENT: "model-missing", errno.ENOTDIR: "model-missing",
                errno.ELOOP: "model-file-link"}.get(err.errno or 0, "unreadable-file")
        raise ModelFilesError(code, f"the model directory cannot be opened: {err.strerror} "
                              "(missing, not a directory, or a symbolic link)",
                              directory) from err
    pending = [(root, "")]
    try:
        while pending:
            dir_fd, prefix = pending.pop()
            try:
                for name in sorted(os.listdir(dir_fd)):
                    rel = prefix + name
                    if not prefix and name in IGNORED_PATHS:
                        ignored.append(name)
                        continue
                    _check_name(rel, directory)
                    fd = _open(name, dir_fd, rel, directory)
                    st = os.fstat(fd)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append((fd, rel + "/"))
                        continue
                    batch.append((fd, st.st_size, rel))
                    sizes[rel] = st.st_size
                    _check_regular(st, rel, directory)
                    total += st.st_size
                    if total > max_bytes:
                        raise ModelFilesError("file-too-large", f"the model's files exceed the "
                                              f"{max_bytes}-byte limit", directory)
                    if len(batch) >= _BATCH:
                        _read_batch(batch, found, directory, on_bytes, keep_only, stage,
                                    staged)
            finally:
                os.close(dir_fd)
        _read_batch(batch, found, directory, on_bytes, keep_only, stage, staged)
    finally:
        for fd, _, _ in batch:
            os.close(fd)
        for fd, _ in pending:
            os.close(fd)
    signature = found.pop(SIGNATURE_FILE, (None, ""))[0]
    digests: dict[str, str] = {}
    hashing: dict[str, concurrent.futures.Future[str]] = {}
    for rel in sorted(found):
        digest = found[rel][1]
        if isinstance(digest, str):
            digests[rel] = digest
        elif defer_staged_hashes:
            hashing[rel] = digest
        else:
            digests[rel] = digest.result()
    files = {rel: data for rel in sorted(found) if (data := found[rel][0]) is not None}
    sizes.pop(SIGNATURE_FILE, None)
    return ModelDir(files, digests, None if signature is None else bytes(signature),
                    tuple(ignored), str(directory), sizes, staged, hashing)


def _read_batch(batch: list[tuple[int, int, str]],
                found: dict[str, tuple[FileData | None, _Digest]], directory: Path,
                on_bytes: Callable[[int], object] | None,
                keep_only: frozenset[str] | None, stage: Staging | None,
                staged: dict[str, str]) -> None:
    """Read and hash the opened files of ``batch`` in parallel, closing each; empties it."""
    if on_bytes is not None:
        lock = threading.Lock()
        report = on_bytes

        def on_bytes(n: int) -> None:
            with lock:
                report(n)

    def one(fd: int, size: int, rel: str) -> tuple[str, tuple[FileData | None, _Digest]]:
        try:
            if stage is not None and keep_only is None and size >= STAGE_MIN_BYTES \
                    and not rel.endswith(ENCRYPTED_SUFFIX) and rel != SIGNATURE_FILE:
                # Encrypted files are decrypted in memory: their plaintext is never staged.
                done = _stage(fd, size, rel, directory, on_bytes, stage)
                if done is not None:
                    staged[rel] = done[2]
                    return rel, done[:2]
            if keep_only is None or rel in keep_only or rel.endswith(ENCRYPTED_SUFFIX) \
                    or rel == SIGNATURE_FILE:
                return rel, _read_hashing(fd, size, rel, directory, on_bytes)
            return rel, (None, _hash_only(fd, size, rel, directory, on_bytes))
        except OSError as err:
            raise ModelFilesError("unreadable-file", f"{rel} cannot be read: {err.strerror}",
                                  directory) from err

    workers = max(1, min(len(batch), os.cpu_count() or 1, 4))
    try:
        if workers == 1:
            found.update(one(*item) for item in batch)
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                found.update(pool.map(lambda item: one(*item), batch))
    finally:
        for fd, _, _ in batch:
            os.close(fd)
        batch.clear()


def _check_name(rel: str, directory: Path) -> None:
    if "\\" in rel or "\x00" in rel:
        raise ModelFilesError("unreadable-file", f"{rel!r}: a file name with a backslash is "
                              "refused", directory)


def _open(name: str, dir_fd: int, rel: str, directory: Path) -> int:
    try:
        return os.open(name, _FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ModelFilesError("model-file-link", f"{rel} is a symbolic link; links may "
                                  "point outside the model directory, so they are refused",
                                  directory) from err
        raise ModelFilesError("unreadable-file", f"{rel} cannot be opened: {err.strerror}",
                              directory) from err


def _check_regular(st: os.stat_result, rel: str, directory: Path) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ModelFilesError("unreadable-file", f"{rel} is not a regular file; refused",
                              directory)
    if st.st_nlink != 1:
        raise ModelFilesError("model-file-link", f"{rel} has {st.st_nlink} hard links; refused "
                              "(it could alias a file outside the model directory)", directory)


def _read_hashing(fd: int, size: int, rel: str, directory: Path,
                  on_bytes: Callable[[int], object] | None) -> tuple[FileData, str]:
    """The file's bytes and their SHA-256, read once.

    A small file is one ``bytes`` object. A large one is read into one buffer by a helper
    thread while this one hashes the pieces already read, and returned as a read-only
    memoryview of that buffer (no copy; nothing else holds the buffer).
    """
    h = hashlib.sha256()
    pieces: Iterable[tuple[int, int]]
    if size <= _PIPELINE:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            data: FileData = f.readall()
        pieces = [(0, len(data))]
        view = memoryview(data)
    else:
        buf = bytearray(size)
        view = memoryview(buf)
        pieces = _ReadAhead(lambda pos: os.readv(fd, [view[pos:pos + _CHUNK]]), size)
    got = 0
    for pos, n in pieces:
        h.update(view[pos:pos + n])
        got += n
        if on_bytes is not None:
            on_bytes(n)
    if got != size or os.read(fd, 1):
        raise ModelFilesError("unreadable-file", f"{rel} changed size while being read",
                              directory)
    return (data if size <= _PIPELINE else view.toreadonly()), h.hexdigest()


def _stage(fd: int, size: int, rel: str, directory: Path,
           on_bytes: Callable[[int], object] | None, stage: Staging
           ) -> tuple[FileData, concurrent.futures.Future[str], str] | None:
    """Copy the file into ``stage``: (read-only view of the copy, its SHA-256 to come, name).

    This thread copies with ``sendfile`` (in the kernel, from the descriptor opened by the
    reader) and returns when the copy is complete; a pool thread hashes each piece already
    copied through a read-only mapping of the copy (what is hashed is what ONNX Runtime will
    map) and resolves the future, possibly after this returns. None when the file cannot be
    staged (no space, a file system without ``sendfile``): the caller reads it into memory.
    """
    try:
        out, name = stage.create()
    except OSError as err:
        log.warning("%s: cannot stage %s (%s); reading it into memory", directory, rel, err)
        return None
    copied: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    digest: concurrent.futures.Future[str] = concurrent.futures.Future()
    hasher: concurrent.futures.Future[None] | None = None
    try:
        os.ftruncate(out, size)
        view = memoryview(mmap.mmap(out, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ))
        hasher = _HASHERS.submit(_hash_pieces, view, copied, digest, on_bytes)
        pos = 0
        try:
            while pos < size and (n := os.sendfile(out, fd, pos, min(_CHUNK, size - pos))):
                copied.put((pos, n))
                pos += n
        finally:
            copied.put(None)  # the hasher ends, however the copy did
        if pos != size or os.pread(fd, 1, size):
            raise ModelFilesError("unreadable-file", f"{rel} changed size while being read",
                                  directory)
        return view.toreadonly(), digest, name
    except OSError as err:
        log.warning("%s: cannot stage %s (%s); reading it into memory", directory, rel, err)
        if hasher is not None:
            hasher.result()
        stage.discard(name)
        os.lseek(fd, 0, os.SEEK_SET)
        return None
    finally:
        os.close(out)


def _hash_pieces(view: memoryview, pieces: queue.SimpleQueue[tuple[int, int] | None],
                 digest: concurrent.futures.Future[str],
                 on_bytes: Callable[[int], object] | None) -> None:
    """Hash the ``(offset, length)`` pieces of ``view`` as they come; None ends them."""
    h = hashlib.sha256()
    try:
        while (piece := pieces.get()) is not None:
            if digest.cancelled():  # the load was refused: the digest is not needed
                return
            pos, n = piece
            h.update(view[pos:pos + n])
            if on_bytes is not None:
                on_bytes(n)
        if digest.set_running_or_notify_cancel():
            digest.set_result(h.hexdigest())
    except BaseException as err:  # handed to whoever waits for the digest
        if digest.set_running_or_notify_cancel():
            digest.set_exception(err)


def _hash_only(fd: int, size: int, rel: str, directory: Path,
               on_bytes: Callable[[int], object] | None) -> str:
    """The file's SHA-256, streamed through one reused buffer (nothing kept)."""
    h = hashlib.sha256()
    buf = bytearray(min(size, _CHUNK) or 1)
    got = 0
    while n := os.readv(fd, [buf]):
        h.update(memoryview(buf)[:n])
        got += n
        if on_bytes is not None:
            on_bytes(n)
    if got != size:
        raise ModelFilesError("unreadable-file", f"{rel} changed size while being read",
                              directory)
    return h.hexdigest()


class _ReadAhead:
    """Iterate ``(offset, length)`` of the pieces of a file a helper thread reads in order
    (``step(offset)`` reads the next piece and returns its length, 0 at the end)."""

    def __init__(self, step: Callable[[int], int], size: int) -> None:
        self._step, self._size = step, size
        self._ready: queue.SimpleQueue[tuple[int, int] | OSError | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, name="model-read", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pos, size = 0, self._size
        try:
            while pos < size:
                n = self._step(pos)
                if n == 0:
                    break
                self._ready.put((pos, n))
                pos += n
            self._ready.put(None)
        except OSError as err:
            self._ready.put(err)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        try:
            while (item := self._ready.get()) is not None:
                if isinstance(item, OSError):
                    raise item
                yield item
        finally:
            self._thread.join()


def plaintext(model: ModelDir, decrypt: Callable[[FileData], bytes] | None
              ) -> tuple[dict[str, FileData], dict[str, str], dict[str, int]]:
    """Files and digests under their plaintext names, ``X.enc`` decrypted in memory.

    Raises :class:`ModelUnavailable` if an encrypted file is present without a way to
    decrypt it, or a file is present both encrypted and in plaintext.
    """
    files: dict[str, FileData] = {}
    digests: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for rel in sorted(model.sizes):  # digests lacks the staged files still being hashed
        if not rel.endswith(ENCRYPTED_SUFFIX):
            sizes[rel] = model.sizes[rel]
            if rel in model.digests:
                digests[rel] = model.digests[rel]
            if rel in model.files:
                files[rel] = model.files[rel]
            continue
        data = model.files[rel]
        if decrypt is None:
            raise ModelUnavailable(f"{rel} is encrypted: a key-encryption key is needed "
                                   "([signing] kek_file or kek_env, or --kek-file)")
        name = rel[: -len(ENCRYPTED_SUFFIX)]
        if name in model.sizes:
            raise ModelUnavailable(f"both {rel} and {name} are present")
        files[name] = decrypt(data)
        digests[name] = hashlib.sha256(files[name]).hexdigest()
        sizes[name] = len(files[name])
    return files, digests, sizes


def files_digest(digests: Mapping[str, str]) -> str:
    """A digest naming an unsigned file set (served only with require_signature = false),
    from the files' SHA-256 (name -> hex)."""
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(rel.encode() + b"\0" + bytes.fromhex(digests[rel]))
    return h.hexdigest()
