"""From a model version directory to bytes ONNX Runtime may load: the steps every path shares.

Serving (start-up, ``ModelAdmin.LoadModel``, re-verification) and ``gateway model verify``
both call :func:`open_version`, so they read with the one reader, verify the same bytes and
resolve external data with the one walker: they cannot reach different verdicts on a model.
The order is fixed: read once -> decrypt in memory -> verify the signature -> resolve every
external-data reference against the verified bytes.

Loading with a staging directory (:mod:`gateway.models._staging`), large files are copied
there by the reader and ONNX Runtime maps the copies; their digests may still be being
computed when the reader returns. Then the order is:

1. the signature is verified over everything else: the bundle, the trust rule, the subject,
   the set of file names, and the digest of every other file (``model.onnx`` included). The
   staged files' digests are taken as signed, for now;
2. the external-data walker checks the verified ``model.onnx``; the admission scanner runs;
3. ONNX Runtime builds the session (mapping the staged copies) while their hashing finishes;
4. :meth:`OpenedVersion.complete`: the signature is verified again, by the same function,
   over every digest. A mismatch refuses the load exactly as a serial check would (same
   error, same audit record) and the session is dropped unused.

This is sound only because what ONNX Runtime reads before step 4 can no longer change: the
copies are private (a 0700 directory of ours, files created by us with ``O_EXCL``, written
only by the reader, never again), and what is hashed is a mapping of the same copies. ONNX
Runtime parses a verified graph whose every external reference names one of them; only the
weights' bytes are checked after it has read them, and nothing is served until they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.errors import ModelUnavailable
from gateway.models import _files
from gateway.models._files import FileData
from gateway.models._staging import Staging
from gateway.models._tensors import (
    RuntimeModel,
    checked_external_data,
    parse_model,
    runtime_model,
)

MODEL_FILE = "model.onnx"


class Verify(Protocol):
    """``verify(name, version, files, digests, signature) -> (digest, signer, rule)``, or None
    when the model may be served unsigned; raises a ModelUnavailable subclass to refuse.

    With ``pending`` (files present whose digests are not known yet, never empty when
    given) everything else is checked, and the step is called again without it.
    """

    def __call__(self, name: str, version: str, files: dict[str, FileData],
                 digests: dict[str, str], signature: bytes | None, /, *,
                 pending: frozenset[str] = ...) -> tuple[str, str, str] | None: ...


@dataclass(frozen=True)
class OpenedVersion:
    """A version whose files were read once, verified, and made loadable."""

    files: dict[str, FileData]
    digest: str
    signer: str
    rule: str
    #: None when opened with ``load=False`` (every check done, no bytes kept for a session).
    runtime: RuntimeModel | None
    #: The final verification, while staged files are still being hashed (see complete()).
    finish: Callable[[], tuple[str, str, str]] | None = dataclasses.field(default=None,
                                                                           repr=False)

    def complete(self) -> OpenedVersion:
        """This version with every digest verified: waits for the staged files' hashes and
        verifies the signature over all digests (raising as :func:`open_version` would have).
        Nothing may be served from a version before this returns."""
        if self.finish is None:
            return self
        digest, signer, rule = self.finish()
        return dataclasses.replace(self, digest=digest, signer=signer, rule=rule, finish=None)


def open_version(directory: Path, name: str, version: str, *, verify: Verify | None,
                 decrypt: Callable[[FileData], bytes] | None,
                 max_bytes: int = _files.DEFAULT_MAX_BYTES,
                 on_bytes: Callable[[int], object] | None = None,
                 load: bool = True, stage: Staging | None = None) -> OpenedVersion:
    """Read, decrypt, verify and resolve one version; raises ModelUnavailable (or a subclass).

    ``load=False`` (``gateway model verify``) makes the same checks with the same reader and
    walker, but keeps only ``model.onnx`` in memory: nothing is built from the weights.
    With ``stage`` (loading), large files are staged there and may still be being hashed:
    call :meth:`OpenedVersion.complete` after building the session, before serving it (see
    the module docstring). The runtime model names the staged copies until the caller
    closes ``stage``.
    """
    model = _files.read_model_dir(directory, max_bytes=max_bytes, on_bytes=on_bytes,
                                  keep_only=None if load else frozenset({MODEL_FILE}),
                                  stage=stage if load else None,
                                  defer_staged_hashes=load and stage is not None)
    try:
        files, digests, sizes = _files.plaintext(model, decrypt)
        if MODEL_FILE not in files:
            raise ModelUnavailable(f"no {MODEL_FILE} in the model directory",
                                   detail=f"{directory}: no {MODEL_FILE}")
    except BaseException:
        for hashed in model.pending.values():
            hashed.cancel()  # refused before any digest matters: stop hashing
        raise

    def check(pending: frozenset[str] = frozenset()) -> tuple[str, str, str]:
        verified = None
        if verify is not None:
            verified = verify(name, version, files, digests, model.signature,
                              pending=pending) if pending else \
                verify(name, version, files, digests, model.signature)
        if verified is not None:
            return verified
        # Unsigned: named by every file's digest, known once none is pending (complete()).
        return ("" if pending else _files.files_digest(digests)), "unverified", ""

    def finish() -> tuple[str, str, str]:
        for rel, hashed in model.pending.items():
            digests[rel] = hashed.result()
        return check()

    if not model.pending:
        digest, signer, rule = check()
        if not load:
            checked_external_data(parse_model(files[MODEL_FILE]), sizes)
            return OpenedVersion(files, digest, signer, rule, None)
        return OpenedVersion(files, digest, signer, rule, runtime_model(
            files[MODEL_FILE], files, staged=model.staged,
            folder=None if stage is None else stage.folder))
    try:
        digest, signer, rule = check(frozenset(model.pending))
        runtime = runtime_model(files[MODEL_FILE], files, staged=model.staged,
                                folder=None if stage is None else stage.folder)
    except ModelUnavailable:
        finish()  # a wrong staged digest is the reason, as when every digest is known first
        raise
    return OpenedVersion(files, digest, signer, rule, runtime, finish)


def runtime_from_dir(directory: Path) -> RuntimeModel:
    """A model directory as ONNX Runtime may load it, unverified (the CLI's model tools).

    The one reader and the one walker, as serving uses them, without a signature check: for
    running a model on this machine (``gateway model profile``, ``gateway model test``)
    without ONNX Runtime opening any path.
    """
    files = _files.plaintext(_files.read_model_dir(directory), None)[0]
    if MODEL_FILE not in files:
        raise ModelUnavailable(f"no {MODEL_FILE} in the model directory",
                               detail=f"{directory}: no {MODEL_FILE}")
    return runtime_model(files[MODEL_FILE], files)
