"""Interop with the real OpenSSF ``model_signing`` 1.x CLI, both directions, key and certificate.

The models carry ONNX external-data weights (``weights.bin``), which both tools must cover.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.models.signing import (
    SignatureError,
    SigningSettings,
    TrustRule,
    read_model_files,
    sign_model,
    verify_files,
    verify_model,
)
from tests.support.signing import write_key, write_model, write_pki

MODEL_SIGNING = str(Path(sys.executable).with_name("model_signing"))


def model_signing(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([MODEL_SIGNING, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def ours(directory: Path, rule: TrustRule, name: str = "iris"):
    return verify_files(name, read_model_files(directory),
                        (directory / "model.sig").read_bytes(), SigningSettings(trust=(rule,)))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    directory = write_model(tmp_path / "models" / "iris" / "1", external=True)
    assert (directory / "weights.bin").stat().st_size > 0
    return directory


def test_ours_key_signature_verifies_with_model_signing(model, tmp_path):
    key, pub = write_key(tmp_path, "k")
    sign_model(model, key=key)
    done = model_signing("verify", "key", model, "--signature", model / "model.sig",
                         "--public_key", pub)
    assert done.returncode == 0, done.stderr + done.stdout
    (model / "weights.bin").write_bytes(b"tampered")
    done = model_signing("verify", "key", model, "--signature", model / "model.sig",
                         "--public_key", pub)
    assert done.returncode != 0 and "weights.bin" in done.stdout + done.stderr


def test_ours_certificate_signature_verifies_with_model_signing(model, tmp_path):
    pki = write_pki(tmp_path)
    sign_model(model, key=pki["key"], cert=pki["cert"], chain=[pki["ca"]])
    done = model_signing("verify", "certificate", model, "--signature", model / "model.sig",
                         "--certificate_chain", pki["ca"])
    assert done.returncode == 0, done.stderr + done.stdout


def test_model_signing_key_signature_verifies_with_ours(model, tmp_path):
    key, pub = write_key(tmp_path, "k")
    done = model_signing("sign", "key", model, "--signature", model / "model.sig",
                         "--private_key", key)
    assert done.returncode == 0, done.stderr + done.stdout
    verified = ours(model, TrustRule(name="release", pubkey=pub))
    assert verified.files == ("metadata.toml", "model.onnx", "weights.bin")
    assert verified.rule == "release"
    _, other_pub = write_key(tmp_path, "other")
    with pytest.raises(SignatureError, match="no trust rule accepts"):
        ours(model, TrustRule(name="other", pubkey=other_pub))


def test_model_signing_certificate_signature_verifies_with_ours(model, tmp_path):
    pki = write_pki(tmp_path)
    done = model_signing("sign", "certificate", model, "--signature", model / "model.sig",
                         "--private_key", pki["key"], "--signing_certificate", pki["cert"],
                         "--certificate_chain", pki["ca"])
    assert done.returncode == 0, done.stderr + done.stdout
    verified = ours(model, TrustRule(name="org", ca=pki["ca"], identities=("release@*",)))
    assert verified.signer == "release@example.com"


def test_files_model_signing_ignores_are_ignored_by_us_too(model, tmp_path):
    """model_signing leaves .git* files out of the manifest; so does the gateway's reader."""
    key, pub = write_key(tmp_path, "k")
    (model / ".gitattributes").write_text("*.bin filter=lfs\n")
    done = model_signing("sign", "key", model, "--signature", model / "model.sig",
                         "--private_key", key)
    assert done.returncode == 0, done.stderr + done.stdout
    verified = ours(model, TrustRule(name="release", pubkey=pub))
    assert ".gitattributes" not in verified.files


def _git_clone_like(model: Path, outside: Path) -> None:
    """What a model cloned from a repository holds besides the model: .git/, dot files."""
    (model / ".git" / "objects" / "ab").mkdir(parents=True)
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / ".git" / "objects" / "ab" / "cdef").write_bytes(b"\x78\x9c blob")
    (model / ".github" / "workflows").mkdir(parents=True)
    (model / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    (model / ".gitignore").write_text("*.tmp\n")
    (model / ".gitattributes").write_text("*.bin filter=lfs\n")
    (model / "sub").mkdir()
    (model / "sub" / ".hidden").write_text("nested dot files are signed\n")
    (model / "sub" / ".gitignore").write_text("only the top-level git paths are ignored\n")
    outside.write_bytes(b"never read")


SIGNED = ["metadata.toml", "model.onnx", "sub/.gitignore", "sub/.hidden", "weights.bin"]


def test_ours_over_a_git_clone_verifies_with_model_signing_cli_and_api(model, tmp_path):
    from model_signing import verifying

    _git_clone_like(model, tmp_path / "outside.bin")
    key, pub = write_key(tmp_path, "k")
    sign_model(model, key=key)
    statement = json.loads(base64.b64decode(
        json.loads((model / "model.sig").read_bytes())["dsseEnvelope"]["payload"]))
    serialization = statement["predicate"]["serialization"]
    assert serialization["ignore_paths"] == [".git", ".gitattributes", ".github", ".gitignore",
                                             "model.sig"]
    assert [r["name"] for r in statement["predicate"]["resources"]] == SIGNED
    done = model_signing("verify", "key", model, "--signature", model / "model.sig",
                         "--public_key", pub)
    assert done.returncode == 0, done.stderr + done.stdout
    verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(
        model, model / "model.sig")
    (model / "sub" / ".hidden").write_text("changed")  # nested dot files are covered
    done = model_signing("verify", "key", model, "--signature", model / "model.sig",
                         "--public_key", pub)
    assert done.returncode != 0 and "sub/.hidden" in done.stdout + done.stderr


@pytest.mark.parametrize("how", ["cli", "api"])
def test_model_signing_over_a_git_clone_verifies_with_ours(model, tmp_path, how):
    from model_signing import signing

    _git_clone_like(model, tmp_path / "outside.bin")
    key, pub = write_key(tmp_path, "k")
    if how == "cli":
        done = model_signing("sign", "key", model, "--signature", model / "model.sig",
                             "--private_key", key)
        assert done.returncode == 0, done.stderr + done.stdout
    else:
        signing.Config().use_elliptic_key_signer(private_key=key).sign(model,
                                                                       model / "model.sig")
    assert list(ours(model, TrustRule(name="release", pubkey=pub)).files) == SIGNED
    # The gateway's CLI and its serving path agree: the one pipeline.
    verified = verify_model(model, SigningSettings(trust=(TrustRule(name="r", pubkey=pub),)))
    assert list(verified.files) == SIGNED


def test_ignored_paths_are_never_opened_or_loaded(model, tmp_path):
    """Even a symlink or FIFO under .git is not looked at: ignored paths are never loaded."""
    from gateway.models._files import read_model_dir

    _git_clone_like(model, tmp_path / "outside.bin")
    (model / ".git" / "escape").symlink_to(tmp_path / "outside.bin")
    (model / ".gitattributes").unlink()
    os.mkfifo(model / ".gitattributes")
    read = read_model_dir(model)
    assert set(read.files) == set(SIGNED)
    assert read.ignored == (".git", ".gitattributes", ".github", ".gitignore")
    assert all(b"never read" not in data for data in read.files.values())
