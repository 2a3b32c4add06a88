"""A private staging directory: large verified files as real files ONNX Runtime may map.

ONNX Runtime builds a session fastest when it maps the external-data file itself; handed
the same bytes from memory it copies them (bench/README.md, "Model supply chain"). A file in
the model directory cannot be handed over as it is: anyone who can write it could change it
after it was hashed. So the one reader copies each large file into a directory of its own
(this module), hashes the copy, and ONNX Runtime maps the copy:

- the directory is made by ``mkdtemp`` (mode 0700) under ``[models] staging_dir``
  (``/dev/shm`` by default: a tmpfs, so staging writes nothing to a disk), named
  ``gw-stage-<pid>-<random>``; when it cannot be made there, models load from memory;
- every file in it is created by this process with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode
  0600, and written only from the descriptor the reader opened: no other user can write or
  swap it, and it is never written again once hashed;
- its names are ours (``f0``, ``f1``, ...), never a name from the model;
- the files are unlinked and the directory removed as soon as the session exists, and on
  every failure path (what ONNX Runtime may still map stays readable to it until the
  session ends; nothing is left on disk).
  Directories left by a process that died are removed at the next start
  (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

#: Files of at least this size are staged; smaller ones stay in memory (one rule, by size:
#: below it the copy ONNX Runtime makes from memory costs little).
STAGE_MIN_BYTES = 16 << 20
_PREFIX = "gw-stage-"
_STALE = re.compile(rf"{_PREFIX}(\d+)-[A-Za-z0-9_]+\Z")
#: ONNX Runtime's session option naming the directory external-data locations are read from
#: when the model is given as bytes (otherwise: the process's working directory).
FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class Staging:
    """One private staging directory, for the files of one model load."""

    def __init__(self, root: Path) -> None:
        self.folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root)
        self._dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                               | os.O_CLOEXEC)
        self._names: list[str] = []
        self._lock = threading.Lock()  # the reader stages several files at once

    def create(self) -> tuple[int, str]:
        """A new empty file of ours: (read-write descriptor, its name in :attr:`folder`)."""
        with self._lock:
            name = f"f{len(self._names)}"
            self._names.append(name)
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self._dir_fd)
        return fd, name

    def discard(self, name: str) -> None:
        """Remove one staged file (staging it failed; its bytes are read into memory)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._dir_fd)

    def close(self) -> None:
        """Unlink every staged file and remove the directory (idempotent)."""
        if self._dir_fd < 0:
            return
        try:
            for name in self._names:
                self.discard(name)
            os.rmdir(self.folder)
        except OSError as err:  # never hides the load's own outcome
            log.warning("staging directory %s not removed: %s", self.folder, err)
        finally:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_staging(root: Path | None) -> contextlib.AbstractContextManager[Staging | None]:
    """A :class:`Staging` under ``root``, or None (load from memory) when ``root`` is None,
    the directory cannot be made, or ONNX Runtime does not honour :data:`FOLDER_KEY`."""
    if root is None or not folder_key_honoured():
        return contextlib.nullcontext(None)
    try:
        return Staging(root)
    except OSError as err:
        log.warning("cannot stage model files under %s (%s); loading from memory", root, err)
        return contextlib.nullcontext(None)


@functools.cache
def folder_key_honoured() -> bool:
    """Whether this ONNX Runtime reads external data from :data:`FOLDER_KEY`'s directory.

    Probed once with a one-tensor model whose weights exist only in a fresh private
    directory: a version that ignores the key (and would resolve locations against the
    working directory) fails to load it, and staging is then never used.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1])
    weight.data_location = TensorProto.EXTERNAL
    folder = tempfile.mkdtemp(prefix="gw-probe-")
    try:
        name = os.path.basename(folder)  # random: no file of that name in the cwd
        Path(folder, name).write_bytes(np.float32(2.0).tobytes())
        weight.external_data.add(key="location", value=name)
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "w"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        options = ort.SessionOptions()
        options.add_session_config_entry(FOLDER_KEY, folder)
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        out = session.run(None, {"x": np.ones(1, np.float32)})[0]
        return bool(out[0] == 2.0)
    except Exception as err:  # any failure: this ONNX Runtime cannot be trusted with it
        log.info("ONNX Runtime does not read external data from %s (%s): models load from "
                 "memory", FOLDER_KEY, err)
        return False
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale(root: Path | None) -> list[str]:
    """Remove staging directories under ``root`` left by processes no longer running.

    Only directories of ours (same owner, not links) named ``gw-stage-<pid>-...`` whose pid
    is gone; a live pid's (another gateway process loading a model) are left alone.
    Returns the names removed.
    """
    removed: list[str] = []
    if root is None:
        return removed
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.name)
        log.info("removed the staging directory %s of process %s, which is gone",
                 entry.path, match.group(1))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
