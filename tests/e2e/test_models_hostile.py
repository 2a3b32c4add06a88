"""The attack, failing: signed models whose tensors point outside the verified files.

Every tensor kind ONNX can carry x every way a location can leave the model directory
(tests/support/hostile_models.py). Each is refused by `gateway model scan`, by `gateway model
verify`, at start-up and by ModelAdmin.LoadModel; none makes inference return bytes that
were not signed; the one ``dummy`` variant per kind (a signed file at the very path the
location names) is served with the dummy's bytes, not the real file's.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.cli import main
from gateway.config import load_config
from gateway.devenv import make_demo_env, start_gateway
from gateway.models import LOADED, REFUSED, ModelRepository, _files
from gateway.models.scan import scan_model
from gateway.models.signing import sign_model, verifier
from tests.conftest import channel_credentials, triton_client
from tests.e2e.test_gateway_audit import _records
from tests.support.hostile_models import OFFSET, SECRET, SIZE, build_corpus
from tests.support.signing import write_key


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    env = make_demo_env(tmp_path_factory.mktemp("hostile"), scan={"isolate": False},
                        models={"reverify_interval": 0.0})
    key = env.certs / "signing" / "demo-signer.key"
    entries = build_corpus(env.root, env.models, lambda d: sign_model(d, key=key))
    with open(env.policies / "policy.csv", "a") as f:
        f.write("\np, role:scorers, hostile-*, infer, allow\n"
                "p, role:scorers, hostile-*, metadata, allow\n")
    secret = (env.root / SECRET).read_bytes()
    return env, entries, secret


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def _caller_safe(message: str, env) -> None:
    assert str(env.root) not in message and "/tmp" not in message, message
    assert ".cc:" not in message and "onnxruntime_src" not in message, message


def test_serving_and_verify_read_with_the_one_reader_and_agree(corpus, monkeypatch, capsys):
    env, entries, _ = corpus
    monkeypatch.chdir(env.root)  # the working directory the attack resolves against
    config = load_config(env.config)
    seen: list[tuple[str, Path]] = []
    real = _files.read_model_dir

    def spy(directory, **kwargs):
        seen.append((who, Path(directory)))
        return real(directory, **kwargs)

    monkeypatch.setattr(_files, "read_model_dir", spy)
    repo = ModelRepository(env.models, session_options=_options, verify=verifier(config.signing),
                           scan=lambda d, files: scan_model(d, config.scan,
                                                            files=files).raise_if_refused())
    for entry in entries:
        who = "serve"
        served = repo.load(entry.name, "1")
        who = "verify"
        code = main(["model", "verify", str(entry.directory), "--config", str(env.config),
                     "--json"])
        out = json.loads(capsys.readouterr().out)
        assert (served.state == LOADED) == (code == 0) == entry.loads, (entry.name, served, out)
        if not entry.loads:
            assert served.state == REFUSED and served.reason, entry.name
            _caller_safe(served.reason, env)
        assert ("serve", entry.directory) in seen and ("verify", entry.directory) in seen
    kinds = {e.kind for e in entries}
    assert len(kinds) == 12 and len(entries) == 12 * 14 - 2


def test_gateway_model_scan_refuses_every_hostile_entry(corpus, capsys):
    env, entries, _ = corpus
    for entry in entries:
        code = main(["model", "scan", str(entry.directory), "--json", "--config",
                     str(env.config)])
        report = json.loads(capsys.readouterr().out)
        assert code == (0 if entry.loads else 1), (entry.name, report)
        codes = {f["code"] for m in report["models"] for f in m["findings"]
                 if f["severity"] == "high"}
        if not entry.loads:
            assert codes & {"external-data-outside", "external-data-missing",
                            "external-data-range", "external-data-malformed",
                            "model-file-link"}, (entry.name, codes)


def test_start_up_load_model_and_inference_never_serve_unsigned_bytes(corpus):
    env, entries, secret = corpus
    leaked = secret[OFFSET:OFFSET + SIZE]
    gw = start_gateway(env)
    try:
        admin = triton_client(gw, "admin")
        scorer = triton_client(gw, "scorer")
        for entry in entries:  # at start-up
            assert admin.is_model_ready(entry.name) == entry.loads, entry.name
        channel = grpc.secure_channel(gw.target, channel_credentials(env, "admin"))
        models = pb_grpc.ModelAdminStub(channel)
        for entry in entries:  # and again through ModelAdmin.LoadModel
            request = pb.LoadModelRequest(name=entry.name, version="1")
            if entry.loads:
                assert models.LoadModel(request).state == "LOADED", entry.name
            else:
                with pytest.raises(grpc.RpcError) as info:
                    models.LoadModel(request)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, entry.name
                _caller_safe(info.value.details(), env)
        channel.close()
        for entry in entries:
            inputs = []
            if any(i.name == "cond" for i in scorer.get_model_metadata(entry.name).inputs) \
                    if entry.loads else False:
                cond = tc.InferInput("cond", [], "BOOL")
                cond.set_data_from_numpy(np.array(True))
                inputs.append(cond)
            if not entry.loads:
                with pytest.raises(InferenceServerException) as refused:
                    scorer.infer(entry.name, inputs)
                assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
                _caller_safe(refused.value.message(), env)
                continue
            out = scorer.infer(entry.name, inputs).as_numpy("out").tobytes()
            assert out != leaked, entry.name
            if entry.expected is not None:
                assert out == entry.expected, (entry.name, out)
        refusals = [r for r in _records(gw) if r.get("kind") == "model_refused"]
    finally:
        gw.stop()
    refused_names = {r["model"]["name"] for r in refusals}
    assert refused_names == {e.name for e in entries if not e.loads}
    # The audit record keeps the full story the caller does not see.
    assert any(str(env.root) in r.get("detail", "") for r in refusals)


def test_model_profile_loads_as_the_gateway_does(tmp_path, monkeypatch, capsys):
    """`gateway model profile` runs the model: from memory too, never by path."""
    (tmp_path / SECRET).parent.mkdir(parents=True)
    (tmp_path / SECRET).write_bytes(b"s" * 256)
    monkeypatch.chdir(tmp_path)
    key, _ = write_key(tmp_path, "k")
    entries = {e.variant: e for e in build_corpus(tmp_path, tmp_path / "models",
                                                  lambda d: sign_model(d, key=key),
                                                  kinds=["constant-value"])}
    np.save(tmp_path / "ref.npy", np.zeros((8, 1), np.float32))
    code = main(["model", "profile", str(entries["cwd"].directory), "--data",
                 str(tmp_path / "ref.npy")])
    assert code == 2 and "external-data-missing" in capsys.readouterr().err
    assert not (entries["cwd"].directory / "profile.json").exists()


def test_two_external_initializers_of_one_name_are_refused(tmp_path):
    """ONNX Runtime takes in-memory initializers by name: a duplicate must not slip past."""
    from onnx import TensorProto, helper

    from gateway.models._tensors import ExternalDataError, runtime_model

    inits = []
    for _ in range(2):
        t = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[SIZE],
                        data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value="weights.bin")
        inits.append(t)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "g", [],
                              [helper.make_tensor_value_info("out", TensorProto.UINT8, [SIZE])],
                              inits)
    model = helper.make_model(graph).SerializeToString()
    with pytest.raises(ExternalDataError, match="two initializers of that name"):
        runtime_model(model, {"model.onnx": model, "weights.bin": bytes(SIZE)})
