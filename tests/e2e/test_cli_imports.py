"""Each `gateway` verb imports what it needs: the offline verbs load no ONNX Runtime, no
onnx, no numpy and no grpc (issue 14: an auditor's toolkit; the e2e tests start hundreds
of CLI processes).

Every verb runs in a fresh interpreter, calling ``gateway.cli.main`` as the console script
does; the probe reports its exit code and which of those packages ``sys.modules`` then holds.
The verb's output is checked too, so a verb that failed early (and so imported little) fails
the test instead of passing it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.audit import signed_sizes, small_log

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("onnxruntime", "onnx", "numpy", "grpc")

# Runs `gateway ARGS...` in this interpreter, then writes {"code", "loaded"} to the file
# named by argv[1] (apart from the verb's own stdout and stderr); argv[2]: the packages.
_PROBE = """
import json, sys
out, heavy, args = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
from gateway.cli import main
try:
    code = main(args)
except SystemExit as stop:
    code = stop.code
sys.stdout.flush()
with open(out, "w") as f:
    json.dump({"code": code, "loaded": [m for m in heavy if m in sys.modules]}, f)
"""


def probe(tmp_path: Path, *args: str) -> tuple[int, list[str], str, str]:
    """Exit code, heavy packages loaded, stdout and stderr of ``gateway ARGS`` in a new
    process."""
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, "-c", _PROBE, str(out), ",".join(HEAVY), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.exists(), done.stderr
    result = json.loads(out.read_text())
    return result["code"], result["loaded"], done.stdout, done.stderr


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A closed log of 20 records with checkpoints every 8, its config and signed sizes."""
    config, settings = small_log(tmp_path_factory.mktemp("imports"), 20)
    sizes = signed_sizes(settings)
    return {"config": str(config), "sizes": [str(size) for size in sizes]}


def test_help_imports_no_verb(tmp_path):
    code, loaded, out, _ = probe(tmp_path, "--help")
    assert code == 0 and "audit" in out and "policy" in out
    assert loaded == []
    code, loaded, out, _ = probe(tmp_path, "policy", "explain", "--help")
    assert code == 0 and "infer" in out  # the actions, filled in when help is printed
    assert loaded == []


def test_policy_verbs_import_no_runtime(tmp_path):
    code, loaded, out, _ = probe(tmp_path, "policy", "test", "policies",
                              "policies/tests/demo.yaml")
    assert code == 0 and "passed" in out
    assert loaded == []
    code, loaded, _, _ = probe(tmp_path, "policy", "check", "policies")
    assert code == 0
    assert loaded == []


def test_policy_explain_with_models_loads_them(tmp_path):
    """The control: a verb that reads a model repository does import the model package
    (and ONNX Runtime with it), so the probe sees imports where they happen."""
    (tmp_path / "models").mkdir()
    code, loaded, out, _ = probe(tmp_path, "policy", "explain", "policies", "--as",
                              "spiffe://demo.local/svc/scorer", "--model", "demo-mlp",
                              "--action", "infer", "--models", str(tmp_path / "models"))
    assert code in (0, 1) and "demo-mlp" in out
    assert "onnxruntime" in loaded and "numpy" in loaded


def test_audit_verbs_import_no_runtime_nor_grpc(log, tmp_path):
    cfg = ("--config", log["config"])
    code, loaded, out, _ = probe(tmp_path, "audit", "verify", "--quiet", "--jobs", "1", *cfg)
    assert code == 0 and "result      OK" in out and " are signed" in out
    assert loaded == []
    code, loaded, out, _ = probe(tmp_path, "audit", "entries", "--from", "2", "--to", "5", *cfg)
    assert code == 0 and len(out.splitlines()) == 3
    assert loaded == []
    code, loaded, proof, _ = probe(tmp_path, "audit", "prove", "3", *cfg)
    assert code == 0 and proof.startswith("c2sp.org/tlog-proof@v1\nindex 3\n")
    assert loaded == []
    old, new = log["sizes"][1], log["sizes"][-1]
    code, loaded, consistency, _ = probe(tmp_path, "audit", "prove-consistency", old, new, *cfg)
    assert code == 0 and consistency.startswith("gateway.audit/consistency-proof@v1\n")
    assert loaded == []
    files = {"proof": tmp_path / "proof"}
    files["proof"].write_text(consistency)
    for size in (old, new):
        files[size] = tmp_path / f"{size}.cp"
        code, _, checkpoint, _ = probe(tmp_path, "audit", "checkpoint", "--size", size, *cfg)
        assert code == 0
        files[size].write_text(checkpoint)
    code, loaded, out, _ = probe(tmp_path, "audit", "verify-consistency", str(files[old]),
                              str(files[new]), str(files["proof"]), *cfg)
    assert code == 0 and f"size {new}" in out
    assert loaded == []


def test_server_verb_loads_grpc_only(tmp_path):
    """A verb that talks to a gateway loads grpc, and a refused connection still ends in
    one line and exit status 2 (the RpcError handler finds grpc where the verb loaded it)."""
    code, loaded, _, err = probe(tmp_path, "model", "list", "--target", "127.0.0.1:1")
    assert code == 2 and err.startswith("gateway: error: UNAVAILABLE")
    assert loaded == ["grpc"]
