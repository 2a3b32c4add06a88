"""The operator CLI against a real gateway, each command run as a subprocess as a user would:
`gateway call`, `demo call`, `model list|load|unload|keygen`, `policy show|reload`, the
[client] config section, errors as one line, exit codes, and receipts that prove inclusion."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys

import grpc
import pytest

from gateway.client import Receipt, ReceiptInterceptor, prove_receipt
from gateway.devenv import REPO, make_demo_env, run_cli, start_gateway
from gateway.models.demo import types_model
from gateway.policy import compile_directory
from tests.conftest import channel_credentials, triton_client
from tests.e2e.test_readme_commands import readme_block


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """A gateway of its own: these tests unload models and reload the policy."""
    env = make_demo_env(tmp_path_factory.mktemp("cli"), models={"reverify_interval": 0.0})
    process = start_gateway(env)
    yield process
    process.stop()


def cli(gw, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """`gateway ARGS --config <the test gateway's config> --target <its port>`."""
    return run_cli(*args, "--config", str(gw.env.config), "--target", gw.target, check=check)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gateway: error: ")
    return lines[0]


def auditor_channel(gw) -> grpc.Channel:
    return grpc.secure_channel(gw.target, channel_credentials(gw.env, "auditor"))


def vkey(gw) -> str:
    return run_cli("audit", "vkey", "--config", str(gw.env.config)).stdout.strip()


# --- gateway call ------------------------------------------------------------------------


def test_call_infers_with_inputs_by_name_and_its_receipt_proves_inclusion(gw):
    proc = cli(gw, "call", "demo-mlp", "--as", "scorer", "--input",
               "input=[0.5, -1, 2, 0.25]", "--json", check=True)
    doc = json.loads(proc.stdout)
    probabilities = next(o for o in doc["outputs"] if o["datatype"] == "FP32")
    assert probabilities["shape"] == [1, 3]
    assert abs(sum(probabilities["data"][0]) - 1) < 1e-5
    receipt = Receipt(doc["receipt"]["index"], bytes.fromhex(doc["receipt"]["leaf_hash"]))
    with auditor_channel(gw) as channel:
        checkpoint = prove_receipt(channel, receipt, vkey(gw))
    assert checkpoint.size > receipt.index
    forged = Receipt(receipt.index, bytes(32))
    with auditor_channel(gw) as channel, pytest.raises(Exception, match="does not verify"):
        prove_receipt(channel, forged, vkey(gw))


def test_call_takes_npy_and_json_files_and_prints_a_table(gw, tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.array([[1, 2, 3, 4], [0, 0, 0, 0]], dtype=np.float64))
    proc = cli(gw, "call", "demo-mlp", "--as", "scorer", "--input", f"input=@{tmp_path}/x.npy",
               check=True)
    assert "probabilities  FP32      [2, 3]" in proc.stdout
    assert "audit receipt: record " in proc.stdout
    (tmp_path / "in.json").write_text(json.dumps({"input": [[1, 2, 3, 4]]}))
    proc = cli(gw, "call", "demo-mlp", "--as", "scorer", "--inputs", str(tmp_path / "in.json"),
               "--json", check=True)
    assert json.loads(proc.stdout)["outputs"][0]["shape"][0] == 1


def test_call_any_model_with_types_from_its_metadata(gw):
    proc = cli(gw, "call", "demo-types", "--as", "scorer", "--example", "--json", check=True)
    outputs = {o["name"]: o for o in json.loads(proc.stdout)["outputs"]}
    assert outputs["out_bool"]["data"] == [[True, False, True]]
    assert outputs["out_uint16"]["datatype"] == "UINT16"
    proc = cli(gw, "call", "demo-types", "--as", "scorer", "--action", "metadata", "--json",
               check=True)
    assert {"name": "in_fp16", "datatype": "FP16", "shape": [-1, 3]} in \
        json.loads(proc.stdout)["inputs"]


def test_call_denied_exits_1_with_the_receipt_on_stderr(gw):
    proc = cli(gw, "call", "demo-mlp", "--as", "intruder", "--example")
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_error_line(proc)
    assert "PERMISSION_DENIED" in line and "audit receipt: index " in line


@pytest.mark.parametrize(("args", "message"), [
    (("--input", "input=[1, 2]"), "input input: shape [1, 2] does not fit the model's [-1, 4]"),
    (("--input", "nope=[1]"), "model demo-mlp has no input(s) nope; its inputs: input"),
    ((), "input input (FP32, shape [-1, 4]) is missing"),
    (("--input", "input=[1,"), "is not JSON"),
])
def test_call_bad_inputs_are_one_clear_line(gw, args, message):
    proc = cli(gw, "call", "demo-mlp", "--as", "scorer", *args)
    assert proc.returncode == 2
    assert message in one_error_line(proc)


def test_missing_certificates_and_running_outside_the_repository(gw, tmp_path):
    proc = cli(gw, "call", "demo-mlp", "--as", "nobody", "--example")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "no certificate for identity 'nobody'" in line and "known: admin" in line
    proc = run_cli("call", "demo-mlp", "--as", "scorer", "--example", check=False,
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert "paths resolve against the working directory" in one_error_line(proc)
    proc = run_cli("demo", "call", "--as", "scorer", check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_demo_call_is_a_thin_case_of_call(gw):
    proc = cli(gw, "demo", "call", "--as", "scorer", "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["model"] == "demo-mlp" and doc["receipt"]["index"] >= 0
    proc = cli(gw, "demo", "call", "--as", "scorer", "--model", "demo-types", check=True)
    assert "out_fp64" in proc.stdout


def test_client_section_of_the_config(gw, tmp_path):
    config = tmp_path / "client.toml"
    cert, key = gw.env.client_files("scorer")
    config.write_text(f'[client]\ntarget = "{gw.target}"\nca = "{gw.env.certs / "ca.pem"}"\n'
                      f'cert = "{cert}"\nkey = "{key}"\n')
    proc = run_cli("call", "demo-mlp", "--example", "--config", str(config), "--json",
                   cwd=tmp_path)
    assert json.loads(proc.stdout)["identity"].startswith(str(cert))
    # The configured identity (the scorer) is used over a verb's default --as (admin) ...
    proc = run_cli("model", "list", "--config", str(config), check=False, cwd=tmp_path)
    assert proc.returncode == 1 and "metadata on @gateway" in one_error_line(proc)
    # ... and an explicit --as over the configured identity.
    proc = run_cli("model", "list", "--as", "admin", "--ca", str(gw.env.certs / "ca.pem"),
                   "--config", str(config), "--json", cwd=tmp_path)
    assert json.loads(proc.stdout)["models"]


# --- admin verbs ---------------------------------------------------------------------------


def test_model_list_unload_load(gw):
    listed = json.loads(cli(gw, "model", "list", "--as", "admin", "--json", check=True).stdout)
    states = {(m["name"], m["version"]): m["state"] for m in listed["models"]}
    assert states[("demo-types", "1")] == "LOADED"
    proc = cli(gw, "model", "unload", "demo-types", "1", "--as", "admin", check=True)
    assert proc.stdout.startswith("demo-types 1: UNLOADED")
    proc = cli(gw, "call", "demo-types", "--as", "scorer", "--example")
    assert proc.returncode == 2 and "FAILED_PRECONDITION" in one_error_line(proc)
    proc = cli(gw, "model", "load", "demo-types", "1", "--as", "admin", "--json", check=True)
    assert json.loads(proc.stdout)["state"] == "LOADED"
    cli(gw, "call", "demo-types", "--as", "scorer", "--example", check=True)


def test_admin_verbs_denied_name_the_gateway_object(gw):
    proc = cli(gw, "model", "list", "--as", "scorer")
    assert proc.returncode == 1
    assert "permission denied: metadata on @gateway" in one_error_line(proc)
    proc = cli(gw, "model", "unload", "demo-mlp", "1", "--as", "scorer")
    assert proc.returncode == 1 and "model.unload on model 'demo-mlp'" in one_error_line(proc)
    proc = cli(gw, "policy", "reload", "--as", "auditor")
    assert proc.returncode == 1 and "policy.load on @gateway" in one_error_line(proc)
    assert cli(gw, "call", "demo-mlp", "--as", "scorer", "--example").returncode == 0


def test_policy_show_and_reload(gw):
    proc = cli(gw, "policy", "show", "--as", "auditor", "--json", check=True)
    shown = json.loads(proc.stdout)
    assert shown["digest"] == compile_directory(gw.env.policies).digest
    assert shown["policy.csv"] == (gw.env.policies / "policy.csv").read_text()
    policy = gw.env.policies / "policy.csv"
    original = policy.read_text()
    try:
        policy.write_text(original + "p, role:scorers, demo-mlp, infr, allow\n")
        proc = cli(gw, "policy", "reload", "--as", "admin")
        assert proc.returncode == 1 and "rejected" in proc.stderr and "infr" in proc.stderr
        assert json.loads(cli(gw, "policy", "show", "--as", "auditor", "--json",
                              check=True).stdout)["digest"] == shown["digest"]
    finally:
        policy.write_text(original)
    proc = cli(gw, "policy", "reload", "--as", "admin", check=True)
    assert "installed" in proc.stdout


def test_model_keygen_makes_a_key_the_signing_tools_use(tmp_path):
    key = tmp_path / "keys" / "release.key"
    proc = run_cli("model", "keygen", str(key))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "release.pub").read_text().startswith("-----BEGIN PUBLIC KEY")
    assert "release.pub" in proc.stdout
    again = run_cli("model", "keygen", str(key), check=False)
    assert again.returncode == 2 and "exists; pass --force" in one_error_line(again)
    model = tmp_path / "m" / "1"
    model.mkdir(parents=True)
    (model / "model.onnx").write_bytes(types_model())  # verify checks it as serving does
    run_cli("model", "sign", str(model), "--key", str(key))
    run_cli("model", "verify", str(model), "--pubkey", str(tmp_path / "keys" / "release.pub"))


# --- conventions ------------------------------------------------------------------------------


def test_a_closed_pipe_is_not_a_traceback():
    proc = subprocess.run(f"{sys.executable} -m gateway policy test policies -v | head -1",
                          shell=True, capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.startswith("PASS policies/tests/demo.yaml:")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_every_argument_of_the_operator_commands_has_help():
    from gateway.cli import build_parser

    parser = build_parser()
    missing = []

    def walk(p, path):
        for action in p._actions:
            if action.dest == "help":
                continue
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help:
                missing.append(f"{' '.join(path)} {action.dest}")

    for top in ("call", "policy", "demo"):
        walk(parser._subparsers._group_actions[0].choices[top], [top])
    model = parser._subparsers._group_actions[0].choices["model"]
    for verb in ("keygen", "load", "unload", "list"):
        walk(model._subparsers._group_actions[0].choices[verb], ["model", verb])
    assert missing == []


def test_an_unreachable_gateway_is_one_line(gw):
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run_cli("model", "list", "--as", "admin", "--config", str(gw.env.config),
                   "--target", f"127.0.0.1:{port}", check=False)
    assert proc.returncode == 2
    assert "UNAVAILABLE" in one_error_line(proc)


# --- receipts for Python callers ------------------------------------------------------------


def test_the_readme_receipt_example_proves_inclusion(gw):
    code = readme_block("receipt-example", "python").replace("127.0.0.1:8443", gw.target)
    proc = subprocess.run([sys.executable, "-c", code], cwd=gw.env.root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"record \d+ is in gateway.local/audit at tree size \d+", proc.stdout)


def test_the_receipt_interceptor_records_denials_too(gw):
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    seen = []
    client = triton_client(gw, "intruder")
    receipts = ReceiptInterceptor.attach(client, on_receipt=lambda m, r: seen.append((m, r)))
    x = tc.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("demo-mlp", [x])
    assert receipts.last is not None and seen[-1][1] == receipts.last
    assert seen[-1][0].endswith("/ModelInfer")
    with auditor_channel(gw) as channel:
        assert prove_receipt(channel, receipts.last, vkey(gw)).size > receipts.last.index


# --- config, make run, audit checkpoint --live ------------------------------------------------


def test_audit_checkpoint_live_is_the_signed_note_of_the_running_log(gw):
    from gateway.audit._note import open_checkpoint, parse_vkey

    proc = cli(gw, "audit", "checkpoint", "--live", "--as", "auditor", check=True)
    verifier = parse_vkey(vkey(gw))
    checkpoint, _ = open_checkpoint(proc.stdout, verifier, verifier.name)
    assert checkpoint.size >= 1
    proc = cli(gw, "audit", "checkpoint", "--live", "--as", "scorer")
    assert proc.returncode == 1 and "audit.read on @gateway" in one_error_line(proc)


def test_make_run_takes_a_config_file():
    proc = subprocess.run(["make", "-n", "run", "CONFIG=/etc/gw/prod.toml"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gateway serve --config /etc/gw/prod.toml" in proc.stdout
    assert "demo init" not in proc.stdout


def test_a_missing_key_error_says_how_relative_paths_resolved(tmp_path):
    config = tmp_path / "elsewhere" / "gw.toml"
    config.parent.mkdir()
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n')
    proc = run_cli("serve", "--config", str(config), check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"resolve against its directory ({config.parent})" in proc.stderr
    assert f"need the same --config {config}" in proc.stderr
