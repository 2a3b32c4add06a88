"""End to end: encrypted models are served from memory; what is served is what was verified."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.devenv import make_demo_env, run_cli, start_gateway
from gateway.models.demo import mlp_model
from tests.conftest import channel_credentials, triton_client

X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def _probabilities(gw) -> np.ndarray:
    inp = tc.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    return triton_client(gw, "scorer").infer("demo-mlp", [inp]).as_numpy("probabilities")


def test_an_encrypted_model_is_decrypted_in_memory_and_served(tmp_path):
    env = make_demo_env(tmp_path / "gw", signing={"kek_file": "kek.hex"})
    run_cli("model", "kekgen", str(env.root / "kek.hex"))
    version = env.models / "demo-mlp" / "1"
    plaintext = (version / "model.onnx").read_bytes()
    run_cli("model", "encrypt", str(version / "model.onnx"), "--kek-file",
            str(env.root / "kek.hex"))
    assert not (version / "model.onnx").exists()
    assert plaintext not in (version / "model.onnx.enc").read_bytes()
    gw = start_gateway(env)
    try:
        expected = ort.InferenceSession(plaintext).run(["probabilities"], {"input": X})[0]
        assert np.array_equal(_probabilities(gw), expected)
    finally:
        gw.stop()
    # Decrypted into memory only: no plaintext model appeared anywhere under the deployment.
    assert not any(p.read_bytes() == plaintext for p in env.root.rglob("*") if p.is_file())


def test_without_the_key_the_encrypted_model_is_refused(tmp_path):
    env = make_demo_env(tmp_path / "gw")
    run_cli("model", "kekgen", str(env.root / "kek.hex"))
    version = env.models / "demo-types" / "1"
    run_cli("model", "encrypt", str(version / "model.onnx"), "--kek-file",
            str(env.root / "kek.hex"))
    gw = start_gateway(env)
    try:
        client = triton_client(gw, "scorer")
        assert client.is_model_ready("demo-mlp")
        assert not client.is_model_ready("demo-types")
    finally:
        gw.stop()


def test_swapping_the_file_during_loads_never_serves_unverified_bytes(tmp_path):
    """A thread keeps swapping model.onnx between the signed bytes and an unsigned model with
    other weights while an admin reloads the model again and again: every load is either
    refused or serves the signed model's predictions, never the impostor's."""
    env = make_demo_env(tmp_path / "gw", models={"reverify_interval": 0.0})
    model = env.models / "demo-mlp" / "1" / "model.onnx"
    signed, impostor = model.read_bytes(), mlp_model(seed=99)
    want = ort.InferenceSession(signed).run(["probabilities"], {"input": X})[0]
    bad = ort.InferenceSession(impostor).run(["probabilities"], {"input": X})[0]
    assert not np.array_equal(want, bad)
    gw = start_gateway(env)
    stop = threading.Event()

    def swap() -> None:
        tmp = model.with_name("swap.tmp")
        flip = False
        while not stop.is_set():
            tmp.write_bytes(impostor if flip else signed)
            tmp.replace(model)  # atomic rename: the loader sees one file or the other
            flip = not flip

    swapper = threading.Thread(target=swap)
    swapper.start()
    states = []
    try:
        channel = grpc.secure_channel(gw.target, channel_credentials(env, "admin"))
        admin = pb_grpc.ModelAdminStub(channel)
        for _ in range(30):
            try:
                status = admin.LoadModel(pb.LoadModelRequest(name="demo-mlp", version="1"))
            except grpc.RpcError as refused:  # the impostor's bytes do not verify
                assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
                states.append("REFUSED")
                continue
            states.append(status.state)
            if status.state == "LOADED":
                assert np.array_equal(_probabilities(gw), want)
        channel.close()
    finally:
        stop.set()
        swapper.join()
        model.write_bytes(signed)
        gw.stop()
    assert set(states) <= {"LOADED", "REFUSED"}
    if "LOADED" not in states:
        pytest.fail("no load saw the signed bytes; the swap test proved nothing")


def test_a_large_model_is_staged_served_and_its_staging_directory_removed(tmp_path):
    """``[models] staging_dir``: the weights of a signed large model are copied there, mapped
    by ONNX Runtime and removed once loaded; the gateway serves the signed weights."""
    from tests.support.signing import write_large_model

    stage = tmp_path / "stage"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (stage / f"gw-stage-{dead}-crashed").mkdir(parents=True)  # left by a dead gateway
    env = make_demo_env(tmp_path / "gw", models={"staging_dir": str(stage)})
    version = env.models / "demo-types" / "2"
    w = write_large_model(version)
    (version / "metadata.toml").write_bytes(
        (env.models / "demo-types" / "1" / "metadata.toml").read_bytes())
    run_cli("model", "sign", str(version), "--key",
            str(env.certs / "signing" / "demo-signer.key"))
    gw = start_gateway(env)
    try:
        assert list(stage.iterdir()) == []  # the stale one removed; loaded: nothing left
        x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = triton_client(gw, "scorer").infer("demo-types", [inp],
                                                model_version="2").as_numpy("y")
        assert np.allclose(got, x @ w, rtol=1e-4, atol=1e-4)
    finally:
        gw.stop()
