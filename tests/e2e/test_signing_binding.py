"""Signatures bound to what they are served as: model name, version, and no rollback."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.devenv import make_demo_env, start_gateway
from gateway.errors import ConfigError
from gateway.models.signing import (
    SignatureError,
    SigningSettings,
    TrustRule,
    read_model_files,
    sign_model,
    verifier,
    verify_files,
)
from tests.conftest import channel_credentials, triton_client
from tests.e2e.test_gateway_audit import _records
from tests.support.signing import write_key, write_model


def _verify(directory: Path, rule: TrustRule, name: str, version: str):
    return verify_files(name, read_model_files(directory), (directory / "model.sig").read_bytes(),
                        SigningSettings(trust=(rule,)), version=version)


def test_the_subject_names_the_model_and_version_by_default(tmp_path):
    key, pub = write_key(tmp_path, "k")
    model = write_model(tmp_path / "models" / "iris" / "3")
    sign_model(model, key=key)
    for bind, name, version, ok in [
        ("version", "iris", "3", True), ("version", "iris", "4", False),
        ("version", "rose", "3", False), ("name", "iris", "3", True),
        ("name", "iris", "4", False),  # the signer named version 3
        ("name", "rose", "3", False), ("", "rose", "9", True),
    ]:
        rule = TrustRule(name="r", pubkey=pub, bind=bind)
        if ok:
            assert _verify(model, rule, name, version).rule == "r"
        else:
            with pytest.raises(SignatureError, match=r"signed as 'iris/3'") as info:
                _verify(model, rule, name, version)
            assert info.value.rule == "r"
    sign_model(model, key=key, subject="iris")  # names the model, any version
    assert _verify(model, TrustRule(name="r", pubkey=pub, bind="name"), "iris", "8").rule == "r"
    with pytest.raises(SignatureError, match="signed as 'iris', not as 'iris/8'"):
        _verify(model, TrustRule(name="r", pubkey=pub, bind="version"), "iris", "8")
    with pytest.raises(ConfigError, match="bind"):
        TrustRule(name="r", pubkey=pub, bind="model")


def test_rollback_to_a_version_never_admitted_is_refused(tmp_path):
    key, pub = write_key(tmp_path, "k")
    dirs = {v: write_model(tmp_path / "models" / "iris" / v) for v in ("1", "2", "3")}
    for directory in dirs.values():
        sign_model(directory, key=key)

    def check(verify, version: str):
        directory = dirs[version]
        files = read_model_files(directory)
        return verify("iris", version, files, None, (directory / "model.sig").read_bytes())

    strict = verifier(SigningSettings(trust=(TrustRule(name="r", pubkey=pub, bind="version",
                                                       no_rollback=True),)))
    assert check(strict, "1") and check(strict, "3")
    assert check(strict, "1")  # re-verifying a version already admitted is no rollback
    with pytest.raises(SignatureError, match="older than version 3, already trusted"):
        check(strict, "2")
    lax = verifier(SigningSettings(trust=(TrustRule(name="r", pubkey=pub),)))
    assert check(lax, "3") and check(lax, "2")


@pytest.fixture(scope="module")
def gateway_env(tmp_path_factory):
    """A gateway started with a signed copy of demo-types already placed as 'copied'."""
    env = make_demo_env(tmp_path_factory.mktemp("binding"), models={"reverify_interval": 0.0})
    shutil.copytree(env.models / "demo-types" / "1", env.models / "copied" / "1")
    gw = start_gateway(env)
    yield gw
    gw.stop()


def test_a_signed_copy_is_refused_at_start_up(gateway_env):
    admin = triton_client(gateway_env, "admin")
    assert admin.is_model_ready("demo-types") and not admin.is_model_ready("copied")
    (refused,) = [r for r in _records(gateway_env) if r.get("kind") == "model_refused"
                  and r["model"]["name"] == "copied"]
    assert "signed as 'demo-types/1'" in refused["reason"]


@pytest.mark.parametrize("source, target", [(("demo-types", "1"), ("demo-mlp", "2")),
                                            (("demo-mlp", "1"), ("demo-mlp", "3"))])
def test_a_signed_copy_under_another_name_or_version_is_refused_and_audited(
        gateway_env, source, target):
    """The demo trust rule binds versions: demo-types' signed bytes do not serve as demo-mlp,
    nor demo-mlp/1's as demo-mlp/3. LoadModel over mTLS says FAILED_PRECONDITION, audited."""
    env = gateway_env.env
    shutil.copytree(env.models / source[0] / source[1], env.models / target[0] / target[1])
    with grpc.secure_channel(gateway_env.target, channel_credentials(env, "admin")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ModelAdminStub(channel).LoadModel(
                pb.LoadModelRequest(name=target[0], version=target[1]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"signed as '{source[0]}/{source[1]}'" in info.value.details()
    admin = triton_client(gateway_env, "admin")
    assert not admin.is_model_ready(target[0], target[1])
    assert admin.is_model_ready("demo-mlp", "1")  # the original keeps serving
    records = _records(gateway_env)
    refused = [r for r in records if r.get("kind") == "model_refused"
               and r["model"] == {"name": target[0], "version": target[1]}]
    assert refused and "binds signatures" in refused[-1]["reason"]
    decisions = [r for r in records if r.get("rpc") == "LoadModel"
                 and r["model"]["name"] == target[0] and r["model"]["version"] == target[1]]
    assert decisions and decisions[-1]["status"] == "FAILED_PRECONDITION"
