"""The ONNX checker and shape inference, runnable in a contained child process.

Both are C++ code fed an untrusted file, and shape inference with data propagation
(``onnx.shape_inference.infer_shapes(..., data_prop=True)``, onnx/docs/ShapeInference.md)
computes constant shape values on the way; so by default the scanner runs this module as a
script in a child with an address-space limit and a timeout, and a crash or blow-up there
is a finding rather than the gateway's death.

This file imports only onnx and the standard library, so running it as a script does not
load the gateway (or its gRPC threads) into the child.

    python _analysis.py MAX_BATCH AS_LIMIT_BYTES < model.onnx > result.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def substitute_dims(model: Any, value: int) -> int:
    """Give every symbolic or unknown graph-input dimension the value ``value``.

    Why: the scanner bounds memory at the largest batch the gateway admits, so a model's
    symbolic batch dimension is taken at that size before shapes are propagated.
    """
    changed = 0
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        for dim in tt.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = value
                changed += 1
    return changed


def _dims(type_proto: Any) -> list[int | None] | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _graph_values(graph: Any, where: str, out: list[list[Any]]) -> None:
    producers = {o: n.op_type for n in graph.node for o in n.output}
    for vi in list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type"):
            out.append([where, vi.name, vi.type.tensor_type.elem_type, _dims(vi.type),
                        producers.get(vi.name, "")])
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                _graph_values(sub, f"{where}/{node.op_type}:{node.name or node.output[0]}", out)


def analyse(model_bytes: bytes, max_batch: int) -> dict[str, Any]:
    """Run the full checker, then shape inference with data propagation at ``max_batch``."""
    import onnx

    result: dict[str, Any] = {"checker": None, "inference": None, "values": []}
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # checker raises ValidationError and InferenceError alike
        result["checker"] = f"{type(err).__name__}: {err}"
    substituted = onnx.ModelProto()
    substituted.CopyFrom(model)
    substitute_dims(substituted, max_batch)
    inferred = None
    for candidate in (substituted, model):
        try:
            inferred = onnx.shape_inference.infer_shapes(candidate, check_type=False,
                                                         strict_mode=False, data_prop=True)
            break
        except Exception as err:
            result["inference"] = f"{type(err).__name__}: {err}"
    if inferred is not None:
        _graph_values(inferred.graph, "graph", result["values"])
    return result


def _main() -> int:
    import resource

    max_batch, limit = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    data = sys.stdin.buffer.read()
    json.dump(analyse(data, max_batch), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
