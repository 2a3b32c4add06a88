"""Every `gateway audit` verb as an auditor runs it (a separate process), attacks failing.

Exit statuses: 0 success, 1 a check fails, 2 a usage or input error, 3 (verify) records not
covered by a signed checkpoint yet.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from gateway.audit._note import Signer
from gateway.devenv import run_cli
from tests.support.audit import signed_sizes, small_log


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A closed log of 40 records, checkpoints every 8, its config, and its records."""
    root = tmp_path_factory.mktemp("cli")
    config, s = small_log(root, 38)
    records = b"".join(p.read_bytes().rstrip(b"\0")
                       for p in sorted((s.directory / "segments").iterdir())).split(b"\n")[:-1]
    sizes = signed_sizes(s)
    return {"root": root, "config": str(config), "dir": s.directory, "records": records,
            "sizes": sizes, "vkey": str(s.signing_key.with_suffix(".vkey"))}


def _gw(log, *args: str):
    return run_cli("audit", *args, "--config", log["config"], check=False)


def test_checkpoint_entry_and_entries(log):
    done = _gw(log, "checkpoint")
    assert done.returncode == 0 and done.stdout == (log["dir"] / "checkpoint").read_text()
    older = log["sizes"][1]
    done = _gw(log, "checkpoint", "--size", str(older))
    assert done.returncode == 0 and f"\n{older}\n" in done.stdout
    never = next(n for n in range(1, 40) if n not in log["sizes"])
    done = _gw(log, "checkpoint", "--size", str(never))
    assert done.returncode == 2 and f"no checkpoint of size {never}" in done.stderr
    done = _gw(log, "entry", "7")
    assert done.returncode == 0 and done.stdout.encode() == log["records"][7]
    done = _gw(log, "entries", "--from", "5", "--to", "9")
    assert done.stdout.encode() == b"".join(r + b"\n" for r in log["records"][5:9])
    done = _gw(log, "entries", "--from", "36", "--json")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [x["index"] for x in lines] == [36, 37, 38, 39]
    assert lines[0]["leaf_hash"] == hashlib.sha256(b"\0" + log["records"][36]).hexdigest()
    assert lines[0]["record"] == json.loads(log["records"][36])
    done = _gw(log, "entries", "--from", "38", "--to", "99")
    assert done.returncode == 2 and "no record 40" in done.stderr
    assert _gw(log, "entry", "4000").returncode == 2


def test_prove_and_verify_proof(log, tmp_path):
    proof = _gw(log, "prove", "7")
    assert proof.returncode == 0 and proof.stdout.startswith("c2sp.org/tlog-proof@v1\nindex 7\n")
    (tmp_path / "p").write_text(proof.stdout)
    (tmp_path / "e").write_bytes(log["records"][7])
    (tmp_path / "other").write_bytes(log["records"][8])
    ok = _gw(log, "verify-proof", str(tmp_path / "p"), "--entry", str(tmp_path / "e"))
    assert ok.returncode == 0 and "record 7" in ok.stdout
    bad = _gw(log, "verify-proof", str(tmp_path / "p"), "--entry", str(tmp_path / "other"))
    assert bad.returncode == 1 and "does not verify" in bad.stderr
    lines = proof.stdout.split("\n")
    lines[2] = "A" * 43 + "="  # one hash of the path replaced
    (tmp_path / "forged").write_text("\n".join(lines))
    bad = _gw(log, "verify-proof", str(tmp_path / "forged"), "--entry", str(tmp_path / "e"))
    assert bad.returncode == 1
    other_key = Signer.generate("test.local/audit").vkey
    bad = run_cli("audit", "verify-proof", str(tmp_path / "p"), "--entry", str(tmp_path / "e"),
                  "--vkey", other_key, check=False)
    assert bad.returncode == 1 and "not signed" in bad.stderr
    never = next(n for n in range(8, 40) if n not in log["sizes"])
    done = _gw(log, "prove", "7", "--size", str(never))
    assert done.returncode == 2 and f"no checkpoint of size {never}" in done.stderr


def test_prove_and_verify_consistency(log, tmp_path):
    old, new = log["sizes"][1], log["sizes"][-1]
    proof = _gw(log, "prove-consistency", str(old), str(new))
    assert proof.returncode == 0
    assert proof.stdout.startswith(f"gateway.audit/consistency-proof@v1\nold {old}\nnew {new}\n")
    files = {}
    for name, size in (("old", old), ("new", new), ("mid", log["sizes"][2])):
        files[name] = tmp_path / f"{name}.cp"
        files[name].write_text(_gw(log, "checkpoint", "--size", str(size)).stdout)
    files["proof"] = tmp_path / "proof"
    files["proof"].write_text(proof.stdout)

    def check(old_cp, new_cp, proof_file):
        return _gw(log, "verify-consistency", str(old_cp), str(new_cp), str(proof_file))

    done = check(files["old"], files["new"], files["proof"])
    assert done.returncode == 0 and f"size {new}" in done.stdout and f"size {old}" in done.stdout
    # Attacks: checkpoints swapped, another size, a hash changed, a forged checkpoint.
    assert check(files["new"], files["old"], files["proof"]).returncode == 1
    assert check(files["mid"], files["new"], files["proof"]).returncode == 1
    lines = proof.stdout.split("\n")
    lines[3] = "A" * 43 + "="
    (tmp_path / "tampered").write_text("\n".join(lines))
    done = check(files["old"], files["new"], tmp_path / "tampered")
    assert done.returncode == 1 and "does not verify" in done.stderr
    forged = tmp_path / "forged.cp"
    forged.write_text(files["new"].read_text().replace(f"\n{new}\n", f"\n{new + 1}\n"))
    assert check(files["old"], forged, files["proof"]).returncode == 1
    # Sizes no checkpoint signs are refused.
    never = next(n for n in range(1, 40) if n not in log["sizes"])
    done = _gw(log, "prove-consistency", str(never), str(new))
    assert done.returncode == 2 and f"no checkpoint of size {never}" in done.stderr


def test_verify_exit_statuses(log, tmp_path):
    done = _gw(log, "verify", "--quiet")
    assert done.returncode == 0 and "result      OK" in done.stdout
    done = _gw(log, "verify", str(log["dir"]), "--quiet")  # no witness copy given
    assert done.returncode == 0 and "freshness   NOT CHECKED" in done.stdout
    copy = tmp_path / "copy"
    shutil.copytree(log["dir"], copy)
    seg = sorted((copy / "segments").iterdir())[-1]
    last = log["records"][-1]
    forged = json.dumps({**json.loads(last), "seq": 40, "prev": hashlib.sha256(
        b"\0" + last).hexdigest()}, sort_keys=True, separators=(",", ":")).encode()
    seg.write_bytes(b"".join(r + b"\n" for r in [*log["records"], forged]))
    done = _gw(log, "verify", str(copy), "--quiet", "--allow-unsigned-tail")
    assert done.returncode == 3 and "NOT COVERED" in done.stdout
    seg.write_bytes(seg.read_bytes().replace(b'"r005"', b'"r905"'))
    done = _gw(log, "verify", str(copy), "--quiet", "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["first_bad_index"] == 6


def test_export_then_verify_it_with_its_own_key(log, tmp_path):
    dest = tmp_path / "backup"
    done = _gw(log, "export", str(dest))
    assert done.returncode == 0 and (dest / "log.vkey").exists()
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text('[audit]\nsigning_key = "nowhere/log.skey"\n')
    done = run_cli("audit", "verify", str(dest), "--config", str(elsewhere), "--quiet",
                   check=False)
    assert done.returncode == 0 and f"from {dest}/log.vkey" in done.stdout
    done = run_cli("audit", "verify", str(dest), "--config", str(elsewhere), "--quiet",
                   "--vkey", Signer.generate("test.local/audit").vkey, check=False)
    assert done.returncode == 1


def test_keygen_and_vkey(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('[audit]\nsigning_key = "k/log.skey"\npayload_key = "k/payload.key"\n')
    made = run_cli("audit", "keygen", "--config", str(config))
    shown = run_cli("audit", "vkey", "--config", str(config))
    assert made.stdout == shown.stdout and made.stdout.startswith("gateway.local/audit+")
    again = run_cli("audit", "keygen", "--config", str(config), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
