"""Admission scanner: refuse hostile or broken ONNX models before they are loaded.

    from gateway.models.scan import scan_model, ScanSettings
    report = scan_model(Path("models/iris/1"), ScanSettings(), files=verified_bytes)
    report.raise_if_refused()          # ModelRefused (FAILED_PRECONDITION) on any high finding

A model is untrusted input to the server. The scan reads the directory with the gateway's one
reader (no symbolic or hard links, no special files) unless given the verified bytes; checks
every external-data reference with the loader's walker (every tensor kind, the location a
file of the model, offset and length inside it); runs the full ``onnx.checker``; allows only
standard operator domains (plus a configured allow-list); bounds declared tensors and the
shapes found by shape inference with data propagation against a memory limit, with symbolic
dimensions taken at the largest batch; checks opsets and file sizes. The checker and shape
inference run in a contained child process, since they are C++ fed an untrusted file.

:func:`session_options` builds the ONNX Runtime options every admitted model is loaded
with (a shared, capped memory arena; bounded threads; no custom-op libraries).

Finding codes (stable): parse-error, checker, model-missing, model-file-link, unreadable-file,
file-too-large, external-data-outside, external-data-missing, external-data-range,
external-data-malformed, custom-op-domain, operator-not-allowed, opset-out-of-range,
initializer-size, huge-allocation, analysis-failed (high); data-dependent-shape,
allocation-estimate, shape-inference (medium).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gateway.models.scan._report import Finding, ModelRefused, ScanReport
from gateway.models.scan._scanner import scan as _scan
from gateway.models.scan._session import run_options, session_options
from gateway.models.scan._settings import ScanSettings

_DEFAULT = ScanSettings()

__all__ = ["Finding", "ModelRefused", "ScanReport", "ScanSettings", "run_options",
           "scan_model", "session_options"]


def scan_model(version_dir: Path, settings: ScanSettings = _DEFAULT, *,
               files: Mapping[str, bytes] | None = None) -> ScanReport:
    """Scan ``version_dir`` (holding ``model.onnx``) and return every finding.

    ``files``: the already-read, verified bytes of the directory's files keyed by relative
    path; when given, those bytes are scanned and the disk is not looked at, so the bytes
    that were verified are the bytes that were scanned. Without them the directory is read
    with the gateway's one reader.
    """
    return _scan(Path(version_dir), settings, files)
