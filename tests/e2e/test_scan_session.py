"""Session memory caps: a model asking for gigabytes fails inside ONNX Runtime, not the process.

Run in a child process, because the capped arena is registered once per process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent('''
    import json, resource
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from gateway.errors import ConfigError
    from gateway.models.scan import run_options, session_options

    out = {}
    opset = [helper.make_opsetid("", 17)]
    so = session_options(256 << 20, 1, 1)
    out["threads"] = [so.intra_op_num_threads, so.inter_op_num_threads]

    # Shape from the request: 2 GiB asked at run time.
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["s"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], "g",
        [helper.make_tensor_value_info("s", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=opset).SerializeToString(),
                                so, providers=["CPUExecutionProvider"])
    out["small"] = float(sess.run(None, {"s": np.array([4, 4, 4], np.int64)}, run_options())[0])
    try:
        sess.run(None, {"s": np.array([1024, 1024, 512], np.int64)})
        out["big"] = "ran"
    except Exception as err:
        out["big"] = str(err)
    # the session still serves after the refusal
    out["after"] = float(sess.run(None, {"s": np.array([2, 2, 2], np.int64)})[0])

    # Constant shape: folded at load, 2 GiB of constants.
    shape = numpy_helper.from_array(np.array([1024, 1024, 512], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])
    try:
        s2 = ort.InferenceSession(helper.make_model(graph, opset_imports=opset)
                                  .SerializeToString(), session_options(256 << 20, 1, 1),
                                  providers=["CPUExecutionProvider"])
        s2.run(None, {})
        out["folded"] = "ran"
    except Exception as err:
        out["folded"] = str(err)

    # A custom-op domain cannot load: no op library is ever registered.
    graph = helper.make_graph([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=opset + [helper.make_opsetid("com.evil", 1)])
    try:
        ort.InferenceSession(model.SerializeToString(), session_options(256 << 20, 1, 1),
                             providers=["CPUExecutionProvider"])
        out["custom"] = "loaded"
    except Exception as err:
        out["custom"] = str(err)
    try:
        session_options(512 << 20, 1, 1)
        out["change"] = "allowed"
    except ConfigError as err:
        out["change"] = str(err)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
''')


def test_session_memory_cap_contains_huge_allocations() -> None:
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["threads"] == [1, 1]
    assert out["small"] == 0.0
    assert "smaller than requested bytes" in out["big"], out["big"]
    assert out["after"] == 0.0
    assert out["folded"] != "ran" and "bytes" in out["folded"], out["folded"]
    assert out["custom"] != "loaded" and "com.evil" in out["custom"]
    assert "cannot change" in out["change"]
    assert out["maxrss_mb"] < 1024, out  # 2 GiB was never materialised
