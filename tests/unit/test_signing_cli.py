"""`gateway model sign|verify|encrypt|decrypt|rewrap|kekgen`, run in-process through main()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from tests.support.signing import write_key, write_model, write_pki


def run_json(capsys, *argv: str | Path) -> tuple[int, dict]:
    capsys.readouterr()  # drop earlier output
    code = main([*map(str, argv), "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture
def setup(tmp_path: Path):
    key, pub = write_key(tmp_path, "signer")
    model = write_model(tmp_path / "models" / "iris" / "1", external=True)
    return model, key, pub


def test_sign_and_verify_with_pubkey(setup, capsys):
    model, key, pub = setup
    code, out = run_json(capsys, "model", "sign", model, "--key", key)
    assert code == 0 and out["ok"] and out["files"] == ["metadata.toml", "model.onnx",
                                                        "weights.bin"]
    code, verified = run_json(capsys, "model", "verify", model, "--pubkey", pub)
    assert code == 0
    assert verified["digest"] == out["digest"] and verified["rule"] == "--pubkey"


def test_verify_failure_is_json_and_nonzero(setup, capsys):
    model, key, pub = setup
    main(["model", "sign", str(model), "--key", str(key)])
    (model / "notes.txt").write_text("unsigned")
    code, out = run_json(capsys, "model", "verify", model, "--pubkey", pub)
    assert code == 2 and out["ok"] is False and "notes.txt" in out["error"]
    assert out["rule"] == "--pubkey"
    assert main(["model", "verify", str(model), "--pubkey", str(pub)]) == 2
    assert "unsigned files present" in capsys.readouterr().err


def test_verify_with_chain_and_identity(setup, capsys, tmp_path):
    model, _, _ = setup
    pki = write_pki(tmp_path)
    assert main(["model", "sign", str(model), "--key", str(pki["key"]), "--cert",
                 str(pki["cert"]), "--chain", str(pki["ca"])]) == 0
    code, out = run_json(capsys, "model", "verify", model, "--chain", pki["ca"],
                         "--identity", "release@example.com")
    assert code == 0 and out["signer"] == "release@example.com"
    code, out = run_json(capsys, "model", "verify", model, "--chain", pki["ca"],
                         "--identity", "someone-else@*")
    assert code == 2 and "someone-else" in out["error"]


def test_verify_with_the_gateway_trust_policy(setup, capsys, tmp_path):
    model, key, pub = setup
    main(["model", "sign", str(model), "--key", str(key)])
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[signing.trust]]\nname = "iris-team"\nmodels = ["iris"]\n'
                      f'pubkey = "{pub}"\n')
    code, out = run_json(capsys, "model", "verify", model, "--config", config)
    assert code == 0 and out["rule"] == "iris-team"
    code, out = run_json(capsys, "model", "verify", model, "--config", config, "--name", "fraud")
    assert code == 2 and "no [signing] trust rule covers" in out["error"]


def test_encrypt_rewrap_decrypt_round_trip(setup, capsys, tmp_path):
    model, key, pub = setup
    main(["model", "sign", str(model), "--key", str(key)])
    original = {p.name: p.read_bytes() for p in model.iterdir()}
    kek1, kek2 = tmp_path / "kek1.hex", tmp_path / "kek2.hex"
    assert run_json(capsys, "model", "kekgen", kek1)[0] == 0
    assert run_json(capsys, "model", "kekgen", kek2)[0] == 0
    code, out = run_json(capsys, "model", "encrypt", model, "--kek-file", kek1)
    assert code == 0 and sorted(Path(p).name for p in out["encrypted"]) == [
        "model.onnx.enc", "weights.bin.enc"]
    assert not (model / "model.onnx").exists() and (model / "metadata.toml").exists()
    code, out = run_json(capsys, "model", "verify", model, "--pubkey", pub)
    assert code == 2 and "key-encryption key is needed" in out["error"]
    code, out = run_json(capsys, "model", "verify", model, "--pubkey", pub, "--kek-file", kek1)
    assert code == 0
    code, out = run_json(capsys, "model", "rewrap", model, "--kek-file", kek1,
                         "--new-kek-file", kek2)
    assert code == 0 and len(out["rewrapped"]) == 2
    code, out = run_json(capsys, "model", "decrypt", model, "--kek-file", kek1)
    assert code == 2 and "not the one given" in out["error"]
    code, out = run_json(capsys, "model", "decrypt", model, "--kek-file", kek2)
    assert code == 0
    assert {p.name: p.read_bytes() for p in model.iterdir()} == original


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    code, out = run_json(capsys, "model", "sign", tmp_path / "nope", "--key", tmp_path / "k")
    assert code == 2 and "cannot read signing key" in out["error"]
    key, _ = write_key(tmp_path, "k")
    code, out = run_json(capsys, "model", "sign", tmp_path / "nope", "--key", key)
    assert code == 2 and "not a directory" in out["error"]
