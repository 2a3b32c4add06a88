"""A corpus of hostile models (no tests here): every tensor kind x every way out of the directory.

Each model is built with ``onnx.helper``, reads one tensor of its kind from external data and
returns it as its output ``out`` (UINT8[16]), so a model that ONNX Runtime loads with data
from outside the verified files would serve those bytes to a caller. Every entry is signed
with the signing key given (the demo key in the tests): the signature is valid, the model is
not. The ``dummy`` variant is the attack as it was reported: the directory carries a signed
dummy at the very path the location names relative to the working directory; it must load,
and serve the dummy's bytes, never the real file's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, helper

#: The file the attack reads: relative to the gateway's working directory (the demo env).
SECRET = "certs/dev/ca.key"
OFFSET = 32
SIZE = 16
DUMMY = b"DUMMYDUMMYDUMMY!"
OPSET = [helper.make_opsetid("", 17)]


@dataclass(frozen=True)
class Entry:
    """One corpus model: where it is, and whether it must load (only ``dummy`` variants)."""

    name: str
    directory: Path
    kind: str
    variant: str
    loads: bool
    #: What a load must serve as ``out`` (None: the output does not show the tensor).
    expected: bytes | None = None


# -- the tensor kinds --------------------------------------------------------------------------

_Ext = Callable[[TensorProto], TensorProto]


def _u8(name: str, ext: _Ext | None = None) -> TensorProto:
    t = helper.make_tensor(name, TensorProto.UINT8, [SIZE], np.zeros(SIZE, np.uint8).tobytes(),
                           raw=True)
    return ext(t) if ext else t


def _indices(ext: _Ext | None = None) -> TensorProto:
    t = helper.make_tensor("idx", TensorProto.INT64, [SIZE],
                           np.arange(SIZE, dtype=np.int64).tobytes(), raw=True)
    return ext(t) if ext else t


def _values() -> TensorProto:
    return helper.make_tensor("vals", TensorProto.UINT8, [SIZE], DUMMY, raw=True)


_OUT = helper.make_tensor_value_info("out", TensorProto.UINT8, [SIZE])
_COND = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])


def _model(nodes, inputs=(), inits=(), sparse=(), functions=(), training=None) -> ModelProto:
    graph = helper.make_graph(list(nodes), "hostile", list(inputs), [_OUT], list(inits))
    graph.sparse_initializer.extend(sparse)
    opsets = OPSET + ([helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 8
    if training is not None:
        model.training_info.append(training)
    return model


def _identity(src: str) -> list:
    return [helper.make_node("Identity", [src], ["out"])]


def _then_else(then_graph) -> list:
    zeros = helper.make_graph([helper.make_node("Constant", [], ["z"], value=_u8("zeros"))],
                              "else", [], [helper.make_tensor_value_info("z", TensorProto.UINT8,
                                                                         [SIZE])])
    return [helper.make_node("If", ["cond"], ["out"], then_branch=then_graph,
                             else_branch=zeros)]


def k_initializer(ext: _Ext) -> tuple[ModelProto, bytes]:
    return _model(_identity("w"), inits=[_u8("w", ext)]), DUMMY


def k_sparse_values(ext: _Ext) -> tuple[ModelProto, bytes]:
    sparse = helper.make_sparse_tensor(_u8("w", ext), _indices(), [SIZE])
    return _model(_identity("w"), sparse=[sparse]), DUMMY


def k_sparse_indices(ext: _Ext) -> tuple[ModelProto, bytes]:
    sparse = helper.make_sparse_tensor(_values(), _indices(ext), [SIZE])
    sparse.values.name = "w"
    return _model(_identity("w"), sparse=[sparse]), DUMMY


def k_constant_value(ext: _Ext) -> tuple[ModelProto, bytes]:
    return _model([helper.make_node("Constant", [], ["k"], value=_u8("k", ext)),
                   *_identity("k")]), DUMMY


def k_constant_sparse_values(ext: _Ext) -> tuple[ModelProto, bytes]:
    sparse = helper.make_sparse_tensor(_u8("k", ext), _indices(), [SIZE])
    return _model([helper.make_node("Constant", [], ["k"], sparse_value=sparse),
                   *_identity("k")]), DUMMY


def k_constant_sparse_indices(ext: _Ext) -> tuple[ModelProto, bytes]:
    sparse = helper.make_sparse_tensor(_values(), _indices(ext), [SIZE])
    return _model([helper.make_node("Constant", [], ["k"], sparse_value=sparse),
                   *_identity("k")]), DUMMY


def k_if_initializer(ext: _Ext) -> tuple[ModelProto, bytes]:
    then = helper.make_graph([helper.make_node("Identity", ["w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.UINT8, [SIZE])],
                             [_u8("w", ext)])
    return _model(_then_else(then), inputs=[_COND]), DUMMY


def k_if_constant(ext: _Ext) -> tuple[ModelProto, bytes]:
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=_u8("t", ext))],
                             "then", [], [helper.make_tensor_value_info("t", TensorProto.UINT8,
                                                                        [SIZE])])
    return _model(_then_else(then), inputs=[_COND]), DUMMY


def k_loop_body(ext: _Ext) -> tuple[ModelProto, bytes]:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Constant", [], ["v_out"], value=_u8("v_out", ext))],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.UINT8, [SIZE])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.UINT8, [SIZE])])
    trip = helper.make_tensor("trip", TensorProto.INT64, [], [1])
    return _model([helper.make_node("Loop", ["trip", "cond", "v0"], ["out"], body=body)],
                  inputs=[_COND], inits=[trip, _u8("v0")]), DUMMY


def k_scan_body(ext: _Ext) -> tuple[ModelProto, bytes]:
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["s_out"], value=_u8("s_out", ext)),
         helper.make_node("Identity", ["x_i"], ["y_i"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.UINT8, [SIZE]),
         helper.make_tensor_value_info("x_i", TensorProto.UINT8, [1])],
        [helper.make_tensor_value_info("s_out", TensorProto.UINT8, [SIZE]),
         helper.make_tensor_value_info("y_i", TensorProto.UINT8, [1])])
    xs = helper.make_tensor("xs", TensorProto.UINT8, [1, 1], [0])
    return _model([helper.make_node("Scan", ["s0", "xs"], ["out", "ys"], body=body,
                                    num_scan_inputs=1)],
                  inits=[_u8("s0"), xs]), DUMMY


def k_function(ext: _Ext) -> tuple[ModelProto, bytes]:
    fn = helper.make_function("local", "Leak", [], ["y"],
                              [helper.make_node("Constant", [], ["y"], value=_u8("y", ext))],
                              [helper.make_opsetid("", 17)])
    return _model([helper.make_node("Leak", [], ["out"], domain="local")],
                  functions=[fn]), DUMMY


def k_training_info(ext: _Ext) -> tuple[ModelProto, None]:
    init = helper.make_graph([helper.make_node("Identity", ["w"], ["t"])], "init", [],
                             [helper.make_tensor_value_info("t", TensorProto.UINT8, [SIZE])],
                             [_u8("w", ext)])
    training = helper.make_training_info(init, [], None, [])
    return _model(_identity("plain"), inits=[_u8("plain")], training=training), None


KINDS: dict[str, Callable[[_Ext], tuple[ModelProto, bytes | None]]] = {
    "initializer": k_initializer,
    "sparse-values": k_sparse_values,
    "sparse-indices": k_sparse_indices,
    "constant-value": k_constant_value,
    "constant-sparse-values": k_constant_sparse_values,
    "constant-sparse-indices": k_constant_sparse_indices,
    "if-initializer": k_if_initializer,
    "if-constant": k_if_constant,
    "loop-body": k_loop_body,
    "scan-body": k_scan_body,
    "function": k_function,
    "training-info": k_training_info,
}


#: No standard operator takes a sparse tensor, so onnx.checker refuses any graph that uses a
#: sparse initializer (ONNX Runtime would densify it): these kinds have no servable variant.
UNSERVABLE = frozenset({"sparse-values", "sparse-indices"})


# -- the ways out ------------------------------------------------------------------------------


def _external(*pairs: tuple[str, str]) -> _Ext:
    def mark(t: TensorProto) -> TensorProto:
        length = len(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in pairs or ():
            entry = t.external_data.add()
            entry.key, entry.value = key, value.replace("{length}", str(length))
        return t

    return mark


def _at(location: str, offset: int = OFFSET) -> _Ext:
    return _external(("location", location), ("offset", str(offset)), ("length", "{length}"))


#: variant -> (external-data marker, whether the model loads). Paths are relative to the
#: model version directory ``<models>/<name>/1`` inside the environment root ``root``.
def variants(root: Path) -> dict[str, tuple[_Ext, bool]]:
    return {
        "absolute": (_at(str(root / SECRET)), False),
        "dotdot": (_at(f"../../../{SECRET}"), False),
        "cwd": (_at(SECRET), False),  # exists relative to the working directory only
        "repository-root": (_at("demo-mlp/1/model.onnx", 0), False),
        "symlink": (_at("weights.bin"), False),
        "hardlink": (_at("weights.bin"), False),
        "backslash": (_at("..\\..\\..\\" + SECRET.replace("/", "\\")), False),
        "nul": (_at("weights.bin\x00/../../../" + SECRET), False),
        "dot": (_at("./weights.bin"), False),
        "range": (_at("weights.bin", 4096), False),
        "negative-offset": (_at("weights.bin", -8), False),
        "two-locations": (_external(("location", "weights.bin"), ("location", str(root / SECRET)),
                                    ("length", "{length}")), False),
        "no-location": (_external(("length", "{length}")), False),
        "dummy": (_at(SECRET), True),  # a signed dummy at the same relative path: served
    }


def _dummy_file(kind: str) -> bytes:
    """What a signed dummy holds at OFFSET: bytes the model then serves (or valid indices)."""
    payload = np.arange(SIZE, dtype=np.int64).tobytes() if kind.endswith("indices") else DUMMY
    return b"#" * OFFSET + payload + b"#" * 64


def build_corpus(root: Path, models: Path, sign: Callable[[Path], object],
                 kinds: list[str] | None = None) -> list[Entry]:
    """Write every kind x variant under ``models/hostile-<kind>--<variant>/1`` and sign each.

    ``root`` is the environment root (the gateway's working directory, holding SECRET).
    """
    entries = []
    outside = root / "outside-secret.bin"
    if not outside.exists():
        outside.write_bytes((root / SECRET).read_bytes())
    for kind in kinds or list(KINDS):
        for variant, (ext, loads) in variants(root).items():
            if variant == "dummy" and kind in UNSERVABLE:
                continue
            name = f"hostile-{kind}--{variant}"
            directory = models / name / "1"
            directory.mkdir(parents=True)
            model, expected = KINDS[kind](ext)
            (directory / "model.onnx").write_bytes(model.SerializeToString())
            (directory / "weights.bin").write_bytes(_dummy_file(kind))
            if variant == "dummy":
                (directory / SECRET).parent.mkdir(parents=True)
                (directory / SECRET).write_bytes(_dummy_file(kind))
            sign(directory)
            if variant == "symlink":
                (directory / "weights.bin").unlink()
                (directory / "weights.bin").symlink_to(root / SECRET)
            elif variant == "hardlink":
                (directory / "weights.bin").unlink()
                os.link(outside, directory / "weights.bin")
            entries.append(Entry(name, directory, kind, variant, loads,
                                 expected if loads else None))
    return entries
