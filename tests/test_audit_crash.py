"""Crash safety: a gateway under load is SIGKILLed 20 times at random moments.

After every restart the log must open (a torn tail is cut and recorded, nothing else may be
wrong), and at the end every call that got an OK response must have its record, at the index
and with the leaf hash of its receipt, in a log that ``gateway audit verify`` accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
from pathlib import Path

import grpc
import pytest

from gateway.audit._store import list_segments, read_data, split_records
from gateway.devenv import make_demo_env, run_cli, start_gateway
from tests.conftest import channel_credentials

KILLS = 20
RECEIPT_INDEX = "gateway-audit-index"
RECEIPT_LEAF = "gateway-audit-leaf-hash"


class _Acks:
    """Receipts of OK responses, and a condition to wait for a number of them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.receipts: dict[int, str] = {}
        self.round = 0
        self.errors: list[str] = []

    def fail(self, err: grpc.RpcError) -> None:
        with self.cond:
            self.errors.append(f"{err.code()}: {err.details()}")
            self.cond.notify_all()

    def add(self, index: int, leaf: str) -> None:
        with self.cond:
            assert self.receipts.setdefault(index, leaf) == leaf, f"index {index} acked twice"
            self.round += 1
            self.cond.notify_all()


def _load(target: str, creds, acks: _Acks, stop: threading.Event) -> None:
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.secure_channel(target, creds) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = np.ones((1, 4), dtype=np.float32)
        req = service_pb2.ModelInferRequest(model_name="demo-mlp",
                                            raw_input_contents=[x.tobytes()])
        req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        while not stop.is_set():
            try:
                _resp, call = stub.ModelInfer.with_call(req, timeout=10)
            except grpc.RpcError as err:
                acks.fail(err)  # the gateway died under us: this call got no OK
                return
            md = dict(call.trailing_metadata())
            acks.add(int(md[RECEIPT_INDEX]), md[RECEIPT_LEAF])


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_record(tmp_path: Path):
    env = make_demo_env(tmp_path / "env")
    creds = channel_credentials(env, "scorer")
    rng = random.Random(20)
    acks = _Acks()
    for _ in range(KILLS):
        gw = start_gateway(env)
        stop = threading.Event()
        with acks.cond:
            acks.round = 0
            acks.errors.clear()
        workers = [threading.Thread(target=_load, args=(gw.target, creds, acks, stop))
                   for _ in range(4)]
        for w in workers:
            w.start()
        target = rng.randrange(1, 80)
        with acks.cond:
            acks.cond.wait_for(lambda t=target: acks.round >= t or acks.errors, timeout=60)
            assert acks.round >= target, (acks.errors, "".join(gw.stderr_lines))
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait()
        stop.set()
        for w in workers:
            w.join(timeout=30)
    # One more clean start and stop: the log must open, and close with a signed checkpoint.
    gw = start_gateway(env)
    assert gw.stop() == 0, "".join(gw.stderr_lines)

    audit_dir = env.root / "audit"
    records: list[bytes] = []
    for _first, path in list_segments(audit_dir):
        records.extend(split_records(read_data(path))[0])
    assert len(acks.receipts) >= KILLS
    for index, leaf in acks.receipts.items():
        assert hashlib.sha256(b"\x00" + records[index]).hexdigest() == leaf, index
    kinds = [json.loads(r)["kind"] for r in records]
    assert kinds.count("log_open") == KILLS + 1
    proc = run_cli("audit", "verify", "--config", str(env.config), "--json", "--quiet",
                   check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], report["findings"]
    assert report["records"] == len(records)
