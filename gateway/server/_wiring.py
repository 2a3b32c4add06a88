"""How a model version becomes servable: the verify/scan/decrypt steps the repository runs,
and the coordinator through which a load or unload reaches every replica.

Kept apart from the repository so that :mod:`gateway.models` stays free of configuration:
this is the one place that turns ``[models]``/``[signing]`` settings into the pipeline, and
``[state]`` into the coordinator (until ``gateway.state.open_state`` provides it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import onnxruntime as ort

from gateway.config import GatewayConfig
from gateway.errors import ModelUnavailable
from gateway.models import FileData, Verify


class ModelPipeline(NamedTuple):
    """The steps :class:`~gateway.models.ModelRepository` runs, as its keyword arguments."""

    #: A fresh ONNX Runtime session configuration per loaded model.
    session_options: Callable[[], ort.SessionOptions]
    #: (name, version, files, digests, model.sig bytes or None) -> (digest, signer, rule), or
    #: None if unsigned and allowed to be.
    verify: Verify
    #: (version directory, files): raises ModelUnavailable if the admission scan refuses.
    scan: Callable[[Path, dict[str, FileData]], None]
    #: An encrypted model file's bytes -> the plain ONNX bytes.
    decrypt: Callable[[FileData], bytes]


def model_pipeline(config: GatewayConfig) -> ModelPipeline:
    """``(session_options, verify, scan, decrypt)`` for :class:`~gateway.models.ModelRepository`."""
    from gateway.models.encryption import decrypt_bytes, load_kek
    from gateway.models.scan import scan_model, session_options
    from gateway.models.signing import verifier

    models, signing, scan_settings = config.models, config.signing, config.scan

    def options() -> ort.SessionOptions:
        # The arena cap is process-wide: one hostile model cannot take the whole process.
        return session_options(memory_limit_bytes=scan_settings.session_memory_bytes,
                               intra_op_threads=models.intra_op_threads,
                               inter_op_threads=models.inter_op_threads)

    verify = verifier(signing)

    def scan(directory: Path, files: dict[str, FileData]) -> None:
        scan_model(directory, scan_settings, files=files).raise_if_refused()

    kek = load_kek(signing)

    def decrypt(blob: FileData) -> bytes:
        if kek is None:
            raise ModelUnavailable("model file is encrypted and no key-encryption key is "
                                   "configured ([signing] kek_file or kek_env)")
        return decrypt_bytes(blob, kek)

    return ModelPipeline(options, verify, scan, decrypt)
