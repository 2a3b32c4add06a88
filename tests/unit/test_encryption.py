"""Encryption at rest: envelope round trips, tamper detection, KEK rotation, signing composition."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.errors import ConfigError, ModelUnavailable
from gateway.models.encryption import (
    EncryptionError,
    _stream,
    decrypt_bytes,
    decrypt_file,
    encrypt_file,
    generate_kek,
    iter_decrypt_file,
    load_kek,
    require_kek,
    rewrap_file,
)
from gateway.models.signing import (
    SignatureError,
    SigningSettings,
    TrustRule,
    read_model_files,
    sign_model,
    verify_files,
)
from tests.support.signing import write_key, write_model

CHUNK = 1024  # smallest allowed chunk size, so multi-chunk cases stay tiny
SEALED = CHUNK + _stream.TAG_LEN
H = _stream.HEADER_LEN


@pytest.fixture
def kek() -> bytes:
    return os.urandom(32)


def encrypted(tmp_path: Path, kek: bytes, data: bytes) -> Path:
    plain = tmp_path / "weights.bin"
    plain.write_bytes(data)
    return encrypt_file(plain, kek, chunk_size=CHUNK)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_round_trip_in_memory_and_streamed(tmp_path, kek, size):
    data = os.urandom(size)
    enc = encrypted(tmp_path, kek, data)
    assert not (tmp_path / "weights.bin").exists(), "plaintext must be removed"
    blob = enc.read_bytes()
    assert data[:16] not in blob[H:] or size < 16
    assert decrypt_bytes(blob, kek) == data
    assert b"".join(iter_decrypt_file(enc, kek)) == data
    chunks = max(1, -(-size // CHUNK))
    assert len(blob) == H + size + chunks * _stream.TAG_LEN


def test_each_artifact_gets_its_own_data_key(tmp_path, kek):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = encrypted(tmp_path / "a", kek, b"same bytes" * 100)
    b = encrypted(tmp_path / "b", kek, b"same bytes" * 100)
    assert a.read_bytes()[H:] != b.read_bytes()[H:]


def flip(blob: bytes, at: int) -> bytes:
    out = bytearray(blob)
    out[at] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("tamper, needle", [
    (lambda b: flip(b, H + 5), "chunk 0 fails authentication"),
    (lambda b: flip(b, H + SEALED + 3), "chunk 1 fails"),
    (lambda b: flip(b, len(b) - 1), "final chunk 2 fails"),
    (lambda b: flip(b, 12), "wrapped data key fails"),           # nonce prefix in the header
    (lambda b: flip(b, 30), "wrapped data key fails"),           # wrap nonce
    (lambda b: b[:H + SEALED] + b[H + 2 * SEALED:], "final chunk 1 fails"),       # dropped
    (lambda b: b[:H] + b[H + SEALED:H + 2 * SEALED] + b[H:H + SEALED] + b[H + 2 * SEALED:],
     "chunk 0 fails"),                                                             # reordered
    (lambda b: b[:H + 2 * SEALED], "final chunk 1 fails"),        # truncated at a boundary
    (lambda b: b[:-5], "final chunk 2 fails"),                    # truncated mid-chunk
    (lambda b: b + b[H:H + SEALED], "chunk 2 fails"),             # chunk appended
    (lambda b: b[:H], "no chunk after the header"),
    (lambda b: b"XXENC1" + b[6:], "bad magic"),
])
def test_tampered_ciphertext_is_refused(tmp_path, kek, tamper, needle):
    enc = encrypted(tmp_path, kek, os.urandom(2 * CHUNK + 100))
    with pytest.raises(EncryptionError, match=needle):
        decrypt_bytes(tamper(enc.read_bytes()), kek)


def test_wrong_kek_is_named(tmp_path, kek):
    enc = encrypted(tmp_path, kek, b"x" * 10)
    with pytest.raises(EncryptionError, match="not the one given"):
        decrypt_bytes(enc.read_bytes(), os.urandom(32))


def test_rewrap_changes_only_the_key_section(tmp_path, kek):
    data = os.urandom(3 * CHUNK)
    enc = encrypted(tmp_path, kek, data)
    before = enc.read_bytes()
    new = os.urandom(32)
    rewrap_file(enc, kek, new)
    after = enc.read_bytes()
    assert after[:_stream.STREAM_HEADER_LEN] == before[:_stream.STREAM_HEADER_LEN]
    assert after[H:] == before[H:], "rewrap must not re-encrypt the data"
    assert after[_stream.STREAM_HEADER_LEN:H] != before[_stream.STREAM_HEADER_LEN:H]
    assert decrypt_bytes(after, new) == data
    with pytest.raises(EncryptionError, match="not the one given"):
        decrypt_bytes(after, kek)
    with pytest.raises(EncryptionError, match="not the one given"):
        rewrap_file(enc, kek, new)


def test_decrypt_file_restores_plaintext(tmp_path, kek):
    data = os.urandom(CHUNK + 3)
    enc = encrypted(tmp_path, kek, data)
    assert decrypt_file(enc, kek).read_bytes() == data
    assert not enc.exists()


def test_kek_sources_and_formats(tmp_path, monkeypatch):
    path = generate_kek(tmp_path / "kek.hex")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kek = load_kek(file=path)
    assert len(kek) == 32
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_kek(path)
    monkeypatch.setenv("GW_KEK", kek.hex())
    assert load_kek(env="GW_KEK") == kek
    import base64

    monkeypatch.setenv("GW_KEK", base64.b64encode(kek).decode())
    assert load_kek(env="GW_KEK") == kek
    monkeypatch.setenv("GW_KEK", "short")
    with pytest.raises(ConfigError, match="32 bytes"):
        load_kek(env="GW_KEK")
    with pytest.raises(ConfigError, match="GW_MISSING"):
        load_kek(env="GW_MISSING")
    assert load_kek() is None
    assert load_kek(SigningSettings()) is None
    assert load_kek(SigningSettings(kek_file=path)) == kek
    with pytest.raises(ConfigError, match="no key-encryption key configured"):
        require_kek(load_kek(SigningSettings()))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_kek(file=path)


def test_signature_covers_plaintext_of_encrypted_files(tmp_path, kek):
    """Sign, encrypt, then verify from decrypted-in-memory bytes; rewrap keeps it valid."""
    key, pub = write_key(tmp_path, "k")
    model = write_model(tmp_path / "models" / "iris" / "1", external=True)
    sign_model(model, key=key)
    for name in ("model.onnx", "weights.bin"):
        encrypt_file(model / name, kek)
    assert sorted(p.name for p in model.iterdir()) == [
        "metadata.toml", "model.onnx.enc", "model.sig", "weights.bin.enc"]
    settings = SigningSettings(trust=(TrustRule(name="r", pubkey=pub),))
    sig = (model / "model.sig").read_bytes()
    assert verify_files("iris", read_model_files(model, kek=kek), sig, settings).rule == "r"
    with pytest.raises(ModelUnavailable, match="key-encryption key is needed"):
        read_model_files(model)
    # Signing an encrypted model signs the plaintext too: same manifest, same bytes.
    sign_model(model, key=key, kek=kek)
    assert (model / "model.sig").read_bytes() == sig
    # A ciphertext swapped for another model's (valid under the same KEK) fails the signature.
    other = write_model(tmp_path / "other", external=False)
    (other / "model.onnx").write_bytes(b"not the signed model")
    encrypt_file(other / "model.onnx", kek)
    os.replace(other / "model.onnx.enc", model / "model.onnx.enc")
    with pytest.raises(SignatureError, match=r"files changed since signing: model\.onnx"):
        verify_files("iris", read_model_files(model, kek=kek), sig, settings)
