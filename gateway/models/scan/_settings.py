"""The scanner's settings (the ``[scan]`` table of the gateway configuration)."""

from __future__ import annotations

from dataclasses import dataclass

# ONNX Runtime 1.32 loads ai.onnx opsets 7..28 and ai.onnx.ml 1..5 (measured: the next
# version up is refused by ValidateOpsetForDomain).
_MAX_OPSET = 28
_MAX_ML_OPSET = 5


@dataclass(frozen=True)
class ScanSettings:
    """What the admission scanner accepts. The defaults refuse anything non-standard."""

    #: Custom-op domains allowed besides the standard "", "ai.onnx" and "ai.onnx.ml".
    #: Nodes in these domains need an op library the gateway never loads, so keep it empty.
    allowed_domains: tuple[str, ...] = ()
    #: If non-empty, the only operators allowed, as "OpType" (standard domain) or
    #: "domain:OpType"; every other operator is a high finding.
    allowed_operators: tuple[str, ...] = ()
    #: Lowest and highest ai.onnx opset accepted.
    min_opset: int = 7
    max_opset: int = _MAX_OPSET
    #: Highest ai.onnx.ml opset accepted.
    max_ml_opset: int = _MAX_ML_OPSET
    #: Largest single file (model.onnx or an external-data file), in bytes.
    max_file_bytes: int = 2 * 1024**3
    #: Memory limit, in bytes, for any one declared or inferred tensor and for all
    #: initializers together; beyond it the model is refused.
    memory_limit_bytes: int = 1024**3
    #: Value assumed for every symbolic input dimension (the largest batch admitted) when
    #: shapes are propagated to bound memory.
    max_batch: int = 64
    #: ONNX Runtime's memory arena cap for the whole process (every session shares it;
    #: see :func:`gateway.models.scan.session_options`): weights of all loaded models plus
    #: the activations of in-flight runs.
    session_memory_bytes: int = 4 * 1024**3
    #: Run the ONNX checker and shape inference in a contained child process.
    isolate: bool = True
    #: Limits of that child: seconds, and address space in bytes.
    analysis_timeout: float = 60.0
    analysis_memory_bytes: int = 4 * 1024**3
