"""Walking an ONNX model: every graph, node and tensor, including subgraphs and functions.

The ONNX IR (onnx/docs/IR.md) nests graphs in node attributes (If/Loop/Scan bodies) and
tensors in initializers, sparse initializers and attributes; a check that looked only at
``model.graph.initializer`` would miss a hostile tensor inside a Loop body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, helper

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def graphs(model: ModelProto) -> Iterator[tuple[str, GraphProto]]:
    """Every graph: the main graph first, then subgraphs of nodes (and of functions)."""
    stack: list[tuple[str, GraphProto]] = [("graph", model.graph)]
    for fn in model.functions:
        for node in fn.node:
            stack.extend(_subgraphs(node, f"function {fn.domain}:{fn.name}"))
    while stack:
        where, graph = stack.pop(0)
        yield where, graph
        for node in graph.node:
            stack.extend(_subgraphs(node, where))


def _subgraphs(node: NodeProto, where: str) -> list[tuple[str, GraphProto]]:
    found = []
    label = f"{where}/{node.op_type}:{node.name or (node.output[0] if node.output else '')}"
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            found.append((label, attr.g))
        elif attr.type == AttributeProto.GRAPHS:
            found.extend((label, g) for g in attr.graphs)
    return found


def nodes(model: ModelProto) -> Iterator[tuple[str, NodeProto]]:
    """Every node of every graph and of every model-local function."""
    for where, graph in graphs(model):
        for node in graph.node:
            yield where, node
    for fn in model.functions:
        for node in fn.node:
            yield f"function {fn.domain}:{fn.name}", node


def tensors(model: ModelProto) -> Iterator[tuple[str, TensorProto, bool]]:
    """Every tensor with data: (where, tensor, is a main-graph initializer)."""
    for where, graph in graphs(model):
        main = graph is model.graph
        for t in graph.initializer:
            yield where, t, main
        for st in graph.sparse_initializer:
            yield where, st.values, False
            yield where, st.indices, False
    for where, node in nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield where, attr.t, False
            yield from ((where, t, False) for t in attr.tensors)
            if attr.HasField("sparse_tensor"):
                yield where, attr.sparse_tensor.values, False
                yield where, attr.sparse_tensor.indices, False
            for st in attr.sparse_tensors:
                yield where, st.values, False
                yield where, st.indices, False


def itemsize(elem_type: int) -> int:
    """Bytes per element of an ONNX element type (strings counted as a pointer)."""
    try:
        return max(1, np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8


def declared_bytes(t: TensorProto) -> int:
    """Bytes the tensor's declared dims and type need (negative dims count as zero)."""
    n = 1
    for d in t.dims:
        n *= max(int(d), 0)
    return n * itemsize(t.data_type)


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


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


def data_location_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def describe(obj: Any) -> str:
    return getattr(obj, "name", "") or "(unnamed)"
