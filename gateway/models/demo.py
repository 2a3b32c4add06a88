"""Demo models, built with ``onnx.helper`` at setup time: nothing is downloaded.

    from gateway.models.demo import build_demo_repository
    build_demo_repository(Path("models"))   # demo-mlp/1 and demo-types/1, unsigned

``demo-mlp`` is a small classifier (4 features -> 3 class probabilities and a label);
``demo-types`` echoes one tensor of every datatype the gateway serves, so the wire codec
can be checked bit for bit. Signing is a separate step (``gateway demo init`` does both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gateway._atomic import write_atomic

#: Opset and IR version chosen for broad ONNX Runtime compatibility.
OPSET = 17
IR_VERSION = 8

#: datatype name used in tensor names -> ONNX element type, one per served OIP datatype.
DEMO_TYPES = {
    "bool": TensorProto.BOOL, "int8": TensorProto.INT8, "int16": TensorProto.INT16,
    "int32": TensorProto.INT32, "int64": TensorProto.INT64, "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16, "uint32": TensorProto.UINT32, "uint64": TensorProto.UINT64,
    "fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT, "fp64": TensorProto.DOUBLE,
}

_MLP_METADATA = """\
owner = "team-risk"

[labels]
sensitivity = "high"
stage = "production"
"""

_TYPES_METADATA = """\
owner = "team-platform"

[labels]
sensitivity = "low"
stage = "test"
"""


def mlp_model(features: int = 4, hidden: int = 8, classes: int = 3, seed: int = 7) -> bytes:
    """A 2-layer MLP: ``probabilities = softmax(relu(x W1 + b1) W2 + b2)``, ``label = argmax``."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (features, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (hidden,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (hidden, classes)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (classes,)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "demo-mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        inits)
    return _serialize(graph)


def types_model(width: int = 3) -> bytes:
    """One ``in_<type>`` -> ``out_<type>`` identity per served datatype, shape [batch, width]."""
    nodes, inputs, outputs = [], [], []
    for name, elem in DEMO_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", width]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", width]))
    return _serialize(helper.make_graph(nodes, "demo-types", inputs, outputs))


def _serialize(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="gateway-demo")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def build_demo_repository(root: Path, *, force: bool = False) -> list[Path]:
    """Write the demo models under ``root`` (kept if present unless ``force``); returns dirs.

    A kept demo model whose ``model.sig`` predates signatures naming their model (subject
    ``1`` instead of ``demo-mlp/1``, refused by the demo trust rule) loses that signature,
    so ``gateway demo init`` signs it again.
    """
    written = []
    for name, model, metadata in (("demo-mlp", mlp_model(), _MLP_METADATA),
                                  ("demo-types", types_model(), _TYPES_METADATA)):
        directory = root / name / "1"
        if (directory / "model.onnx").exists() and not force:
            _drop_unbound_signature(directory, f"{name}/1")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "model.onnx", model)
        write_atomic(directory / "metadata.toml", metadata.encode())
        written.append(directory)
    return written


def demo_reference(rows: int = 4000, seed: int = 0, features: int = 4) -> np.ndarray:
    """Seeded reference inputs of demo-mlp, N(0, 1) per feature: what its profile is fitted on
    (``gateway demo init``), so inputs far from it raise the anomaly alarm."""
    return np.random.default_rng(seed).normal(0, 1, (rows, features)).astype(np.float32)


def _drop_unbound_signature(directory: Path, subject: str) -> None:
    from gateway.models.signing import SignatureError, signed_subject

    signature = directory / "model.sig"
    try:
        signed = signed_subject(signature.read_bytes())
    except (OSError, SignatureError):
        return
    if signed != subject:
        signature.unlink()
