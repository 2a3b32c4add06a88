"""Size arithmetic for the scanner; walking the model is :mod:`gateway.models._tensors`'s job.

The ONNX IR (onnx/docs/IR.md) nests graphs in node attributes (If/Loop/Scan bodies),
functions and training info, and tensors in initializers, sparse initializers and
attributes; one walker enumerates them all, so the scanner and the loader cannot disagree.
"""

from __future__ import annotations

from onnx import TensorProto

from gateway.models._tensors import itemsize, nodes

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

__all__ = ["STANDARD_DOMAINS", "inline_bytes", "nodes", "values_bytes"]


def values_bytes(elem_type: int, dims: list[int | None] | None) -> tuple[int, bool]:
    """Lower bound of a value's size (unknown dims count 1) and whether it is exact."""
    if dims is None:
        return 0, False
    n, exact = 1, True
    for d in dims:
        if d is None:
            exact = False
        else:
            n *= max(d, 0)
    return n * itemsize(elem_type), exact


def inline_bytes(t: TensorProto) -> int | None:
    """Length of inline data when stored as raw bytes (typed fields are not compared)."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return None
