"""Cost and quality of the monitor, measured side by side in one run (`make bench`).

Cost: per request, ONNX Runtime inference of a small MLP alone (the baseline) against the same
inference plus the monitor's hot-path calls (admit, score, observe_output, observe_request)
with anomaly scoring on and off, single-threaded and with 16 threads. This measures the
library only; the end-to-end gateway comparison over gRPC is the lead's.
Quality: detection and false-positive rates of the input score at calibrated FPRs on fresh
synthetic data (see tests/unit/test_monitor_detection.py for the asserted targets).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from gateway.monitor import InputProfile, Monitor, MonitorSettings

D = 10
_MIX = np.random.default_rng(7).standard_normal((D, D)) * 0.5 + np.eye(D)


def _data(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((n, D)) @ _MIX.T
    x = g.copy()
    x[:, 1] = np.exp(0.5 * g[:, 1])
    x[:, 4] = g[:, 4] ** 3 / 4
    return (x * np.linspace(0.5, 3.0, D) + np.arange(D) * 2.0).astype(np.float32)


def _session() -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((D, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["l"]),
         helper.make_node("Softmax", ["l"], ["y"], axis=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("W1", TensorProto.FLOAT, w1.shape, w1.ravel().tolist()),
         helper.make_tensor("W2", TensorProto.FLOAT, w2.shape, w2.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _request(session, monitor: Monitor | None, profile, caller: str, x: np.ndarray) -> None:
    if monitor is not None:
        monitor.admit(caller)
        monitor.score("mlp/1", profile, caller, x)
    (y,) = session.run(None, {"x": x})
    if monitor is not None:
        monitor.observe_output("mlp/1", y)
        monitor.observe_request("mlp", "1", "infer", "allow", "OK",
                                {"decision": 1e-4, "inference": 1e-4, "audit": 1e-4,
                                 "total": 4e-4})


def _throughput(session, monitor, profile, rows, threads: int, per_thread: int) -> float:
    barrier = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            k = (t * per_thread + i) % len(rows)
            _request(session, monitor, profile, f"caller-{t}", rows[k:k + 1])

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in pool:
        th.join()
    return threads * per_thread / (time.perf_counter() - start)


def run() -> None:
    ref = _data(10000, 1)
    t0 = time.perf_counter()
    profile = InputProfile.fit(ref, outputs=_session().run(None, {"x": ref})[0], seed=0)
    print(f"monitor: profile fit on 10000x{D} rows in {time.perf_counter() - t0:.2f} s")
    session = _session()
    rows = _data(20000, 2)
    on = Monitor(MonitorSettings(metrics_listen=""))
    off = Monitor(MonitorSettings(metrics_listen="", scoring=False))
    # Single thread: interleave the three variants so drift in machine load hits all alike.
    n = 3000
    times = {"inference only": 0.0, "monitor, scoring off": 0.0, "monitor, scoring on": 0.0}
    for i in range(n):
        x = rows[i:i + 1]
        for name, mon in (("inference only", None), ("monitor, scoring off", off),
                          ("monitor, scoring on", on)):
            start = time.perf_counter()
            _request(session, mon, profile, "bench", x)
            times[name] += time.perf_counter() - start
    base = times["inference only"]
    print("monitor: per request, batch 1, one thread (baseline: inference only)")
    for name, total in times.items():
        print(f"  {name:<24} {1e6 * total / n:8.1f} us   x{total / base:.2f}")
    start = time.perf_counter()
    for i in range(n):
        on.score("mlp/1", profile, "bench2", rows[i:i + 1])
    print(f"  score() alone            {1e6 * (time.perf_counter() - start) / n:8.1f} us")
    batch = rows[:256]
    start = time.perf_counter()
    for _ in range(200):
        on.score("mlp/1", profile, "bench3", batch)
    print(f"  score() batch of 256     {1e6 * (time.perf_counter() - start) / 200:8.1f} us")

    print("monitor: throughput with 16 threads (requests/s; ratio to inference only)")
    per = 400
    base_tp = _throughput(session, None, profile, rows, 16, per)
    off_tp = _throughput(session, off, profile, rows, 16, per)
    on_tp = _throughput(session, on, profile, rows, 16, per)
    for name, tp in (("inference only", base_tp), ("scoring off", off_tp),
                     ("scoring on", on_tp)):
        print(f"  {name:<24} {tp:9.0f}/s  x{tp / base_tp:.3f}")
    print(f"  scoring on vs off: {100 * (1 - on_tp / off_tp):+.1f}% throughput cost")

    print("monitor: input score quality on fresh data (detection at calibrated FPR)")
    lo, hi = ref.min(0), ref.max(0)
    rng = np.random.default_rng(3)
    fresh = rows.astype(np.float64)
    cases = {"uniform probes": rng.uniform(lo, hi, size=fresh.shape),
             "permuted features": np.take_along_axis(
                 fresh, np.argsort(rng.random(fresh.shape), axis=1), axis=1),
             "mean shift 1 sd": fresh + ref.std(0),
             "scale x2": (fresh - ref.mean(0)) * 2 + ref.mean(0),
             "correlation break": np.stack([rng.permutation(fresh[:, j]) for j in range(D)], 1)}
    for fpr in (0.01, 0.001):
        thr = profile.threshold(fpr)
        measured = float((profile.score(fresh) > thr).mean())
        rates = ", ".join(f"{k} {float((profile.score(v) > thr).mean()):.3f}"
                          for k, v in cases.items())
        print(f"  FPR {fpr}: measured FPR {measured:.4f}; {rates}")


if __name__ == "__main__":
    run()
