"""From a model version directory to bytes ONNX Runtime may load: the steps every path shares.

Serving (start-up, ``ModelAdmin.LoadModel``, re-verification) and ``gateway model verify``
both call :func:`open_version`, so they read with the one reader, verify the same bytes and
resolve external data with the one walker: they cannot reach different verdicts on a model.
The order is fixed: read once -> decrypt in memory -> verify the signature -> resolve every
external-data reference against the verified bytes.

Loading, large files are staged (:mod:`gateway.models._staging`): copied by the reader into a
private directory and hashed there, and ONNX Runtime maps that copy. The session is built
only after the signature verified every digest, the copy included: nothing ONNX Runtime
parses was unverified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

#: ``verify(name, version, files, digests, signature) -> (digest, signer, rule)`` or None
#: when the model may be served unsigned; raises a ModelUnavailable subclass to refuse.
Verify = Callable[[str, str, dict[str, FileData], dict[str, str], bytes | None],
                  tuple[str, str, str] | None]


@dataclass(frozen=True)
class OpenedVersion:
    """A version whose files were read once, verified, and made loadable from memory."""

    files: dict[str, FileData]
    digest: str
    signer: str
    rule: str
    #: None when opened with ``load=False`` (every check done, no bytes kept for a session).
    runtime: RuntimeModel | None


def open_version(directory: Path, name: str, version: str, *, verify: Verify | None,
                 decrypt: Callable[[FileData], bytes] | None,
                 max_bytes: int = _files.DEFAULT_MAX_BYTES,
                 on_bytes: Callable[[int], object] | None = None,
                 load: bool = True, stage: Staging | None = None) -> OpenedVersion:
    """Read, decrypt, verify and resolve one version; raises ModelUnavailable (or a subclass).

    ``load=False`` (``gateway model verify``) makes the same checks with the same reader and
    walker, but keeps only ``model.onnx`` in memory: nothing is built from the weights.
    With ``stage`` (loading), large files are staged there; the runtime model names the
    staged copies until the caller closes ``stage`` (after building the session).
    """
    model = _files.read_model_dir(directory, max_bytes=max_bytes, on_bytes=on_bytes,
                                  keep_only=None if load else frozenset({MODEL_FILE}),
                                  stage=stage if load else None)
    files, digests, sizes = _files.plaintext(model, decrypt)
    if MODEL_FILE not in files:
        raise ModelUnavailable(f"no {MODEL_FILE} in the model directory",
                               detail=f"{directory}: no {MODEL_FILE}")
    verified = verify(name, version, files, digests, model.signature) \
        if verify is not None else None
    digest, signer, rule = verified or (_files.files_digest(files), "unverified", "")
    if not load:
        checked_external_data(parse_model(files[MODEL_FILE]), sizes)
        return OpenedVersion(files, digest, signer, rule, None)
    return OpenedVersion(files, digest, signer, rule, runtime_model(
        files[MODEL_FILE], files, staged=model.staged,
        folder=None if stage is None else stage.folder))


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
