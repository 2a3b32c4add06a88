"""Crash safety: a gateway under load is SIGKILLed 20 times at random moments, and a few
more times at random moments of its start (while it opens, cuts and signs the log).

After every restart the log must open (a torn tail or the unacknowledged commit in flight is
cut and recorded, nothing else may be wrong) and hold every record acknowledged so far, at the
index and with the leaf hash of its receipt; at the end the log must pass
``gateway audit verify``. Checkpoints are due every 20 ms, so kills also land while a
checkpoint and its witness copy are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from gateway.audit._store import list_segments, read_data, split_records
from gateway.devenv import make_demo_env, run_cli, start_gateway
from tests.conftest import channel_credentials

KILLS = 20
#: Extra kills at a random moment of a start, before the gateway serves.
START_KILLS = 6
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


def _disk_records(audit_dir: Path) -> list[bytes]:
    records: list[bytes] = []
    for _first, path in list_segments(audit_dir):
        records.extend(split_records(read_data(path))[0])
    return records


def _check_receipts(audit_dir: Path, receipts: dict[int, str]) -> list[bytes]:
    records = _disk_records(audit_dir)
    for index, leaf in receipts.items():
        assert index < len(records), f"acknowledged record {index} is gone"
        assert hashlib.sha256(b"\x00" + records[index]).hexdigest() == leaf, index
    return records


def _kill_during_start(env, delay: float) -> None:
    """Start ``gateway serve`` and SIGKILL it ``delay`` seconds later, wherever it is then.

    The delay picks the moment of the kill (the experiment), it synchronises nothing.
    """
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                             str(env.config), "--log-level", "WARNING"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=env.root)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_record(tmp_path: Path):
    env = make_demo_env(tmp_path / "env", audit={"checkpoint_ms": 20})
    # The load calls demo-mlp only: without the other demo model each of the starts below
    # scans and loads one model, not two (the property is the log's, not the repository's).
    shutil.rmtree(env.models / "demo-types")
    creds = channel_credentials(env, "scorer")
    rng = random.Random(20)
    acks = _Acks()
    audit_dir = env.root / "audit"
    start_kills = set(rng.sample(range(KILLS), START_KILLS))
    for n in range(KILLS):
        if n in start_kills:
            _kill_during_start(env, rng.uniform(0.3, 2.5))
        gw = start_gateway(env)
        # The log opened: every record acknowledged before the kills is still there.
        _check_receipts(audit_dir, acks.receipts)
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

    records = _check_receipts(audit_dir, acks.receipts)
    assert len(acks.receipts) >= KILLS
    kinds = [json.loads(r)["kind"] for r in records]
    assert kinds.count("log_open") >= KILLS + 1  # start kills may have opened it too
    proc = run_cli("audit", "verify", "--config", str(env.config), "--json", "--quiet",
                   check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], report["findings"]
    assert report["records"] == len(records)
