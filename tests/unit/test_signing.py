"""OMS signing: sign/verify over in-memory files, trust policy, strictness and tamper tests.

Interop with the real ``model_signing`` package lives in ``test_signing_interop.py``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import load_config
from gateway.errors import ConfigError, ModelUnavailable
from gateway.models._files import ModelFilesError
from gateway.models.signing import (
    SignatureError,
    SigningSettings,
    TrustRule,
    VerifiedModel,
    _bundle,
    ensure_demo_signing_key,
    read_model_files,
    sign_model,
    verify_files,
    verify_model,
)
from tests.support.signing import write_key, write_model, write_pki

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "keys").mkdir()
    a_key, a_pub = write_key(tmp_path / "keys", "a")
    b_key, b_pub = write_key(tmp_path / "keys", "b")
    return {"a_key": a_key, "a_pub": a_pub, "b_key": b_key, "b_pub": b_pub}


@pytest.fixture
def model(tmp_path: Path, keys) -> Path:
    directory = write_model(tmp_path / "models" / "iris" / "1", external=True)
    sign_model(directory, key=keys["a_key"])
    return directory


def trust(*rules: TrustRule) -> SigningSettings:
    return SigningSettings(trust=rules)


def check(directory: Path, settings: SigningSettings, name: str = "iris",
          now: dt.datetime | None = None, version: str = "1") -> VerifiedModel:
    files = read_model_files(directory)
    return verify_files(name, files, (directory / "model.sig").read_bytes(), settings, now=now,
                        version=version)


def refused(directory: Path, settings: SigningSettings, *needles: str, name: str = "iris",
            now: dt.datetime | None = None) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        check(directory, settings, name, now)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return info.value


def resign_payload(directory: Path, key: Path, mutate) -> None:
    """Replace model.sig with a correctly signed bundle over a mutated statement."""
    bundle = json.loads((directory / "model.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    mutate(statement)
    payload = rfc8785.dumps(statement)
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    sig = private.sign(_bundle.pae(_bundle.DSSE_PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    hint = bundle["verificationMaterial"]["publicKey"]["hint"]
    (directory / "model.sig").write_bytes(_bundle.build_bundle(payload, sig, key_hint=hint))


def set_resources(statement: dict, resources: list[dict]) -> None:
    """Put ``resources`` in the statement with a consistent subject digest."""
    import hashlib

    statement["predicate"]["resources"] = resources
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    statement["subject"][0]["digest"]["sha256"] = root


# --- happy paths ------------------------------------------------------------------------

def test_sign_then_verify_in_memory_reports_digest_signer_and_rule(model, keys):
    verified = check(model, trust(TrustRule(name="release", pubkey=keys["a_pub"])))
    assert verified.rule == "release"
    assert verified.signer.startswith("sha256:") and len(verified.signer) == 71
    assert len(verified.digest) == 64
    assert verified.files == ("metadata.toml", "model.onnx", "weights.bin")


def test_signature_is_deterministic_canonical_json(model, keys):
    first = (model / "model.sig").read_bytes()
    sign_model(model, key=keys["a_key"])
    assert (model / "model.sig").read_bytes() == first
    bundle = json.loads(first)
    assert rfc8785.dumps(bundle) == first
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    assert [r["name"] for r in statement["predicate"]["resources"]] == [
        "metadata.toml", "model.onnx", "weights.bin"]


def test_two_keys_valid_at_once_for_rotation(model, keys):
    settings = trust(TrustRule(name="new", pubkey=keys["b_pub"]),
                     TrustRule(name="old", pubkey=keys["a_pub"]))
    assert check(model, settings).rule == "old"
    sign_model(model, key=keys["b_key"])
    assert check(model, settings).rule == "new"


def test_certificate_signing_and_identity_rules(model, tmp_path):
    pki = write_pki(tmp_path)
    sign_model(model, key=pki["key"], cert=pki["cert"], chain=[pki["ca"]])
    ok = check(model, trust(TrustRule(name="org", ca=pki["ca"], identities=("release@*",))))
    assert (ok.signer, ok.rule) == ("release@example.com", "org")
    refused(model, trust(TrustRule(name="org", ca=pki["ca"], identities=("ops@*",))),
            "no trust rule accepts", "'org'", "release@example.com")
    other = write_pki(tmp_path, stem="other")
    refused(model, trust(TrustRule(name="other-ca", ca=other["ca"])),
            "'other-ca'", "chain does not validate")
    # Judged at verification time: after the signing certificate expired it is refused.
    refused(model, trust(TrustRule(name="org", ca=pki["ca"])), "chain does not validate",
            now=NOW + dt.timedelta(days=3))


def test_certificate_without_code_signing_usage_is_refused(model, tmp_path):
    pki = write_pki(tmp_path, code_signing=False)
    sign_model(model, key=pki["key"], cert=pki["cert"])
    refused(model, trust(TrustRule(name="org", ca=pki["ca"])), "codeSigning")


# --- tamper tests -----------------------------------------------------------------------

@pytest.fixture
def settings(keys) -> SigningSettings:
    return trust(TrustRule(name="release", pubkey=keys["a_pub"]))


def test_changed_byte_is_named(model, settings):
    data = bytearray((model / "weights.bin").read_bytes())
    data[5] ^= 1
    (model / "weights.bin").write_bytes(bytes(data))
    refused(model, settings, "files changed since signing: weights.bin")


@pytest.mark.parametrize("content", [b"", b"#!/bin/sh\n"])
def test_added_file_even_empty_is_refused(model, settings, content):
    (model / "extra.txt").write_bytes(content)
    refused(model, settings, "unsigned files present", "extra.txt")


def test_removed_file_is_named(model, settings):
    (model / "weights.bin").unlink()
    refused(model, settings, "signed files missing: weights.bin")


def test_renamed_file_is_missing_and_extra(model, settings):
    (model / "weights.bin").rename(model / "weights2.bin")
    err = refused(model, settings, "missing: weights.bin", "weights2.bin")
    assert err.rule == "release"


def test_wrong_key_is_untrusted(model, keys):
    err = refused(model, trust(TrustRule(name="b", pubkey=keys["b_pub"])),
                  "no trust rule accepts")
    assert isinstance(err, ModelUnavailable)


def test_edited_payload_fails_the_signature(model, settings):
    (model / "weights.bin").write_bytes(b"evil weights")
    bundle = json.loads((model / "model.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    import hashlib

    for r in statement["predicate"]["resources"]:
        if r["name"] == "weights.bin":
            r["digest"] = hashlib.sha256(b"evil weights").hexdigest()
    set_resources(statement, statement["predicate"]["resources"])
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(rfc8785.dumps(statement)).decode()
    (model / "model.sig").write_text(json.dumps(bundle))
    refused(model, settings, "does not verify")


@pytest.mark.parametrize("bad", ["../secret.txt", "/etc/passwd", "a/../b", "./model.onnx",
                                 "a//b", "dir\\x"])
def test_unsafe_name_in_a_signed_manifest_is_refused(model, keys, settings, bad):
    def mutate(statement):
        resources = statement["predicate"]["resources"]
        resources.append({"name": bad, "algorithm": "sha256", "digest": "0" * 64})
        set_resources(statement, resources)

    resign_payload(model, keys["a_key"], mutate)
    refused(model, settings, "signed manifest refused", repr(bad))


def test_symlinks_are_refused_when_reading_signing_and_verifying(model, keys, settings, tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"x")
    os.symlink(tmp_path / "outside.bin", model / "link.bin")
    with pytest.raises(ModelFilesError, match=r"link\.bin is a symbolic link"):
        read_model_files(model)
    with pytest.raises(ModelFilesError, match="symbolic link"):
        verify_model(model, settings)
    with pytest.raises(ModelFilesError, match="symbolic link"):
        sign_model(model, key=keys["a_key"])


def test_symlinked_directory_and_special_files_are_refused(model, settings, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", model / "sub")
    with pytest.raises(ModelFilesError, match="sub is a symbolic link"):
        read_model_files(model)
    (model / "sub").unlink()
    os.mkfifo(model / "pipe")
    with pytest.raises(ModelFilesError, match="pipe is not a regular file"):
        read_model_files(model)
    with pytest.raises(ModelFilesError, match="pipe is not a regular file"):
        verify_model(model, settings)


def test_revoked_key_is_refused_from_its_revocation_time(model, keys):
    rule = TrustRule(name="release-2025", pubkey=keys["a_pub"],
                     revoked_at=(NOW + dt.timedelta(days=1)).isoformat())
    assert check(model, trust(rule)).rule == "release-2025"
    err = refused(model, trust(rule), "rule 'release-2025' revoked",
                  now=NOW + dt.timedelta(days=2))
    assert err.rule == "release-2025"
    # A revoked key stays revoked even when another (unrevoked) rule still lists it.
    also = TrustRule(name="legacy", models=("iris",), pubkey=keys["a_pub"])
    refused(model, trust(also, rule), "rule 'release-2025' revoked",
            now=NOW + dt.timedelta(days=2))
    # Rotation: the new key keeps working after the old one is revoked.
    sign_model(model, key=keys["b_key"])
    assert check(model, trust(rule, TrustRule(name="2026", pubkey=keys["b_pub"])),
                 now=NOW + dt.timedelta(days=2)).rule == "2026"


def test_key_trusted_only_for_other_models(model, keys):
    err = refused(model, trust(TrustRule(name="fraud", models=("fraud-*",), pubkey=keys["a_pub"]),
                               TrustRule(name="iris", models=("iris",), pubkey=keys["b_pub"])),
                  "may not sign this model", "rule 'fraud' only for fraud-*")
    assert err.rule == "fraud"
    refused(model, trust(TrustRule(name="fraud", models=("fraud-*",), pubkey=keys["a_pub"])),
            "no [signing] trust rule covers")


@pytest.mark.parametrize("mutate, needle", [
    (lambda b: b.update(extra=1), "unknown field(s) extra"),
    (lambda b: b["verificationMaterial"].update(timestampVerificationData={}), "unknown field"),
    (lambda b: b.update(mediaType="application/vnd.dev.sigstore.bundle+json;version=0.2"),
     "mediaType"),
    (lambda b: b["dsseEnvelope"].update(payloadType="text/plain"), "payloadType"),
    (lambda b: b["dsseEnvelope"]["signatures"].append(b["dsseEnvelope"]["signatures"][0]),
     "exactly one signature"),
    (lambda b: b["verificationMaterial"].update(tlogEntries=[{}]), "tlogEntries"),
])
def test_malformed_bundles_are_refused(model, settings, mutate, needle):
    bundle = json.loads((model / "model.sig").read_text())
    mutate(bundle)
    (model / "model.sig").write_text(json.dumps(bundle))
    refused(model, settings, "malformed model.sig", needle)


def test_duplicate_json_keys_are_refused(model, settings):
    text = (model / "model.sig").read_text()
    (model / "model.sig").write_text(text[:-1] + ',"mediaType":"x"}')
    refused(model, settings, "duplicate JSON key")


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.update(predicateType="https://model_signing/Digests/v0.1"), "predicateType"),
    (lambda s: s["predicate"]["serialization"].update(hash_type="blake2"), "hash_type"),
    (lambda s: s["predicate"]["serialization"].update(method="shards"), "method"),
    (lambda s: s["predicate"]["serialization"].update(allow_symlinks=True), "allow_symlinks"),
    (lambda s: s["predicate"]["resources"][0].update(algorithm="sha512"), "algorithm"),
    (lambda s: s["predicate"].update(model_card={}), "unknown field(s) model_card"),
])
def test_unknown_predicates_and_algorithms_are_refused(model, keys, settings, mutate, needle):
    resign_payload(model, keys["a_key"], mutate)
    refused(model, settings, needle)


def test_unsupported_key_algorithms_are_refused(model, tmp_path):
    k1 = write_key(tmp_path, "k1", ec.SECP256K1())
    with pytest.raises(SignatureError, match="secp256k1"):
        sign_model(model, key=k1[0])
    refused(model, trust(TrustRule(name="k1", pubkey=k1[1])), "rule 'k1'",
            "unsupported ECDSA curve secp256k1")


def test_files_argument_names_are_checked(model, settings):
    files = read_model_files(model)
    files["../x"] = b""
    with pytest.raises(SignatureError, match=r"'\.\.' component"):
        verify_files("iris", files, (model / "model.sig").read_bytes(), settings)


# --- configuration and demo key ---------------------------------------------------------

def test_trust_rules_parse_from_the_config_file(tmp_path):
    (tmp_path / "gateway.toml").write_text('''
[signing]
kek_env = "GATEWAY_KEK"
[[signing.trust]]
name = "release"
models = ["fraud-*"]
pubkey = "keys/release.pub"
revoked_at = "2026-12-01T00:00:00Z"
[[signing.trust]]
name = "org"
ca = "org-ca.pem"
identities = ["release@example.com"]
''')
    signing = load_config(tmp_path / "gateway.toml").signing
    assert [r.name for r in signing.trust] == ["release", "org"]
    assert signing.trust[0].models == ("fraud-*",)
    assert signing.trust[0].pubkey.name == "release.pub"
    assert signing.kek_env == "GATEWAY_KEK"


def test_trust_rule_paths_resolve_against_the_config_directory(tmp_path):
    (tmp_path / "gateway.toml").write_text('[[signing.trust]]\nname = "r"\npubkey = "k.pub"\n')
    signing = load_config(tmp_path / "gateway.toml").signing
    assert signing.trust[0].pubkey == tmp_path / "k.pub"


@pytest.mark.parametrize("body, needle", [
    ('name = "x"\n', "exactly one of pubkey and ca"),
    ('name = "x"\npubkey = "a"\nrevoked_at = "soon"\n', "ISO 8601"),
    ('name = "x"\npubkey = "a"\nrevoked_at = "2026-01-01T00:00:00"\n', "time zone"),
    ('name = "x"\npubkey = "a"\ncolour = "red"\n', "colour"),
])
def test_bad_trust_rules_are_config_errors(tmp_path, body, needle):
    (tmp_path / "gateway.toml").write_text("[[signing.trust]]\n" + body)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / "gateway.toml")


def test_demo_key_is_created_once_and_trusted_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    private, public = ensure_demo_signing_key(Path("certs/dev/signing"))
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes()
    assert ensure_demo_signing_key(Path("certs/dev/signing")) == (private, public)
    assert private.read_bytes() == before
    directory = write_model(tmp_path / "models" / "demo" / "1")
    sign_model(directory, key=private)
    assert check(directory, SigningSettings(), name="demo").rule == "demo"
