"""How a model version becomes servable: the verify/scan/decrypt steps the repository runs.

Kept apart from the repository so that :mod:`gateway.models` stays free of configuration:
this is the one place that turns ``[models]``/``[signing]`` settings into the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from gateway.config import GatewayConfig
from gateway.errors import ModelUnavailable


def model_pipeline(config: GatewayConfig) -> tuple[Callable[[], ort.SessionOptions], ...]:
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

    def scan(directory: Path, files: dict[str, bytes]) -> None:
        scan_model(directory, scan_settings, files=files).raise_if_refused()

    kek = load_kek(signing)

    def decrypt(blob: bytes) -> bytes:
        if kek is None:
            raise ModelUnavailable("model file is encrypted and no key-encryption key is "
                                   "configured ([signing] kek_file or kek_env)")
        return decrypt_bytes(blob, kek)

    return options, verify, scan, decrypt
