"""Interop with the real OpenSSF ``model_signing`` 1.x CLI, both directions, key and certificate.

The models carry ONNX external-data weights (``weights.bin``), which both tools must cover.
"""

from __future__ import annotations

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
)
from tests.test_signing_fixtures import write_key, write_model, write_pki

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
