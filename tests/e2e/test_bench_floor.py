"""The benchmark's floor server does what its figures claim: mTLS, one durable record a call.

``make bench`` reports the gateway's targets against this floor (bench/plain_server.py
``--audit``). If it skipped the record, or let a caller in without a certificate, the floor
would be flattering and the conclusion drawn from it wrong; these tests keep it honest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from gateway.audit._store import read_records
from gateway.devenv import REPO, make_demo_env, run_cli
from tests.conftest import triton_client_at


@pytest.fixture(scope="module")
def floor(tmp_path_factory):
    env = make_demo_env(tmp_path_factory.mktemp("floor"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.plain_server", str(env.models), str(env.certs),
         "--audit", str(env.config)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield env, line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _infer(client: tc.InferenceServerClient, request_id: str) -> np.ndarray:
    x = tc.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return client.infer("demo-mlp", [x], request_id=request_id).as_numpy("probabilities")


def test_every_call_leaves_one_chained_durable_record(floor):
    env, target = floor
    client = triton_client_at(env, target, "scorer")
    ids = [f"floor-{i}" for i in range(5)]
    for request_id in ids:
        assert _infer(client, request_id).shape[0] == 1
    records = [json.loads(r) for _, _, recs, _tail in read_records(env.audit) for r in recs]
    decisions = [r for r in records if r["kind"] == "decision"]
    assert [r["request_id"] for r in decisions] == ids
    # The chain holds (each record names the leaf hash of the one before it), and the
    # records are on disk: verify reads them back from the segment files.
    # A live log: the newest records may not be under a signed checkpoint yet (exit 3).
    result = run_cli("audit", "verify", "--config", str(env.config), "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode in (0, 3) and report["findings"] == [], result.stdout
    assert report["records"] == len(records)


def test_a_caller_without_a_certificate_is_refused(floor):
    env, target = floor
    with pytest.raises(InferenceServerException):
        _infer(triton_client_at(env, target, None), "no-cert")
