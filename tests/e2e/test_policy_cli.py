"""`gateway policy check|test|explain|diff|fmt`, run through the real CLI entry point."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gateway.cli import main
from gateway.devenv import REPO
from gateway.policy import compile_directory
from tests.unit.test_policy_engine import DEMO, write_policy


@pytest.fixture(autouse=True)
def _in_repository(monkeypatch):
    """Messages show paths relative to the working directory: run from the repository."""
    monkeypatch.chdir(REPO)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_accepts_the_demo_policy(capsys):
    code, out, _ = run(capsys, "check", DEMO)
    assert code == 0
    assert "ok:" in out and compile_directory(DEMO).digest in out


def test_check_lists_every_error_with_file_and_line(tmp_path, capsys):
    directory = write_policy(tmp_path, "p, alice, m, infer, allow\np, alice\n"
                             "p, alice, m, infer, allow, caller.id.lower() == 'x'\n")
    code, out, err = run(capsys, "check", directory)
    assert code == 2 and out == ""
    assert "policy.csv:2: p rule needs 5 fields" in err
    assert "policy.csv:3: bad condition: calls are not allowed" in err
    assert "Traceback" not in err


def test_test_passes_the_shipped_cases_and_reports_coverage(capsys):
    code, out, _ = run(capsys, "test", DEMO, DEMO / "tests" / "demo.yaml")
    assert code == 0
    assert "cases passed" in out and "rules exercised" in out


def test_test_prints_failures_and_uncovered_rules(tmp_path, capsys):
    directory = write_policy(tmp_path, "p, alice, m, infer, allow\n"
                             "p, alice, m, ready, allow\n"
                             "p, alice, m, metadata, deny\n")
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n"
                     "  - {caller: alice, model: m, action: infer, expect: allow}\n"
                     "  - {caller: alice, model: m, action: metadata, expect: allow}\n")
    code, out, _ = run(capsys, "test", directory, cases)
    assert code == 1
    assert (f"FAIL {cases}:3: alice metadata m: expected allow, got deny by policy.csv:3"
            in out)
    assert "1/2 cases passed; 2/3 rules exercised" in out
    assert f"{directory}/policy.csv:2: p, alice, m, ready, allow" in \
        out.split("rules no case exercised:")[1]


def test_test_rejects_malformed_cases(tmp_path, capsys):
    cases = tmp_path / "bad.yaml"
    cases.write_text("cases:\n  - {caller: alice, model: m, action: infer, expct: allow}\n")
    code, _, err = run(capsys, "test", DEMO, cases)
    assert code == 2 and "unknown key(s) expct" in err


def test_explain_names_the_deciding_rule_and_the_nearest_allowing_rule(capsys):
    code, out, _ = run(capsys, "explain", DEMO, "--as", "spiffe://demo.local/svc/scorer",
                       "--model", "demo-mlp", "--action", "infer",
                       "--attr", "model.labels.stage=retired")
    assert code == 1  # denied
    lines = out.splitlines()
    assert lines[0].startswith("decision: DENY by policies/policy.csv:13")
    assert "deciding rule: policies/policy.csv:13: p, role:scorers, *, infer, deny, " \
           "model.labels.stage == 'retired'" in out
    assert "role path: spiffe://demo.local/svc/scorer -> role:scorers " \
           "(policies/policy.csv:27)" in out
    assert "overridden allow: policies/policy.csv:7: p, role:scorers, demo-mlp, infer, allow" \
        in out


def test_explain_default_deny_shows_what_differs(capsys):
    code, out, _ = run(capsys, "explain", DEMO, "--as", "spiffe://demo.local/svc/intruder",
                       "--model", "demo-mlp", "--action", "infer")
    assert code == 1
    assert "decision: DENY by default-deny" in out
    nearest = out.split("nearest rules that would allow it:\n")[1].splitlines()
    assert nearest[0].strip() == "policies/policy.csv:7: p, role:scorers, demo-mlp, infer, allow"
    assert "differs in subject: spiffe://demo.local/svc/intruder does not hold role:scorers" \
        in nearest[1]


def test_explain_allow(capsys):
    code, out, _ = run(capsys, "explain", DEMO, "--as", "spiffe://demo.local/team/audit/auditor",
                       "--action", "audit.read")
    assert code == 0 and out.startswith("decision: ALLOW by policies/policy.csv:16")


OLD = """\
p, role:scorers, demo-*, infer, allow
p, role:scorers, demo-b, infer, deny
p, role:ops, m1, model.load, allow
g, alice, role:scorers
g, bob, role:ops
"""

NEW = """\
p, role:scorers, demo-*, infer, allow
p, role:ops, m1, model.load, allow
p, role:ops, @gateway, audit.read, allow
g, alice, role:scorers
g, bob, role:scorers
"""


def test_diff_lists_exactly_the_changed_access(tmp_path, capsys):
    old = write_policy(tmp_path / "old", OLD)
    new = write_policy(tmp_path / "new", NEW)
    code, out, _ = run(capsys, "diff", old, new, "--models", tmp_path / "no-repo")
    assert code == 0
    changes = sorted(line.split("  (")[0] for line in out.splitlines()
                     if line.startswith(("+ ", "- ")))
    assert changes == sorted([
        # demo-b's deny went away: the scorers (alice, role:scorers, now bob) gain infer on it
        "+ alice infer demo-b",
        "+ role:scorers infer demo-b",
        "+ bob infer demo-*",
        "+ bob infer demo-b",
        # bob left ops: loses model.load on m1
        "- bob model.load m1",
        # ops gains audit.read on the gateway (role only: nobody holds ops now)
        "+ role:ops audit.read @gateway",
    ])
    code, _, _ = run(capsys, "diff", old, new, "--exit-code", "--models", tmp_path / "none")
    assert code == 1
    code, out, _ = run(capsys, "diff", old, old, "--exit-code")
    assert code == 0 and "no change in effective access" in out


def test_diff_includes_repository_models_and_git_revisions(tmp_path, capsys, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    write_policy(repo / "policies", OLD)
    for name, stage in (("demo-new", "production"), ("demo-old", "retired")):
        (repo / "models" / name / "1").mkdir(parents=True)
        (repo / "models" / name / "1" / "metadata.toml").write_text(
            f'owner = "team"\n[labels]\nstage = "{stage}"\n')
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "old"], check=True)
    (repo / "policies" / "policy.csv").write_text(
        NEW + "p, role:scorers, *, infer, deny, model.labels.stage == 'retired'\n")
    monkeypatch.chdir(repo)
    code, out, _ = run(capsys, "diff", "HEAD", "policies")
    assert code == 0
    changes = [line.split("  (")[0] for line in out.splitlines() if line.startswith(("+ ", "- "))]
    assert "+ bob infer demo-new:1" in changes  # a repository model no rule names exactly
    assert "- alice infer demo-old:1" in changes  # through its label: stage = retired
    assert not any("bob infer demo-old" in line for line in changes)  # retired: no gain
    assert "  + p, role:scorers, *, infer, deny, model.labels.stage == 'retired'" in out
    code, _, err = run(capsys, "diff", "no-such-rev", str(repo / "policies"))
    assert code == 2 and "neither a directory nor a git revision" in err


MESSY = """\
#  header comment
p,alice ,  m-* ,infer,allow,   request.batch_size<=8&&(caller.id=='a'||caller.id=="b")


p , bob, m, ready, deny
g,alice,role:x
"""


def test_fmt_is_canonical_idempotent_and_keeps_meaning(tmp_path, capsys):
    directory = write_policy(tmp_path, MESSY)
    before = compile_directory(directory)
    code, out, _ = run(capsys, "fmt", directory, "--check")
    assert code == 1 and "would reformat" in out
    assert (directory / "policy.csv").read_text() == MESSY  # --check changes nothing
    code, _, _ = run(capsys, "fmt", directory)
    assert code == 0
    text = (directory / "policy.csv").read_text()
    assert text == ("#  header comment\n"
                    "p, alice, m-*, infer, allow, request.batch_size <= 8 && "
                    "(caller.id == 'a' || caller.id == 'b')\n"
                    "\n"
                    "p, bob, m, ready, deny\n"
                    "g, alice, role:x\n")
    code, out, _ = run(capsys, "fmt", directory, "--check")
    assert code == 0 and out == ""
    code, _, _ = run(capsys, "fmt", directory)
    assert (directory / "policy.csv").read_text() == text
    after = compile_directory(directory)
    for a, b in zip(before.source.rules, after.source.rules, strict=True):
        assert (a.sub, a.obj, a.act, a.deny, a.cond.text if a.cond else None) == \
            (b.sub, b.obj, b.act, b.deny, b.cond.text if b.cond else None)


def test_fmt_refuses_an_invalid_policy(tmp_path, capsys):
    directory = write_policy(tmp_path, "p, alice\n")
    code, _, err = run(capsys, "fmt", directory)
    assert code == 2 and "policy.csv:1" in err
    assert (directory / "policy.csv").read_text() == "p, alice\n"


def test_shipped_policy_is_canonically_formatted(capsys):
    code, out, _ = run(capsys, "fmt", DEMO, "--check")
    assert (code, out) == (0, "")


def test_tools_read_model_metadata_as_strictly_as_the_server(tmp_path):
    """`policy diff`/`explain` see a version's attributes only if the server would serve it:
    one parser, so metadata the server refuses never yields attributes a tool evaluates."""
    from gateway.errors import ModelUnavailable
    from gateway.models import repository_attributes
    from gateway.models._metadata import parse_metadata

    root = tmp_path / "models"
    bad = {"1": 'owner = 5\n', "2": '[labels]\nstage = 3\n', "3": "owner = \n"}
    for version, text in {**bad, "4": 'owner = "team"\n[labels]\nstage = "prod"\n'}.items():
        (root / "m" / version).mkdir(parents=True)
        (root / "m" / version / "metadata.toml").write_text(text)
    (root / "m" / "5").mkdir()  # no metadata: no owner, no labels
    found = {version: attrs for _, version, attrs in repository_attributes(root)}
    assert set(found) == {"4", "5"}
    assert found["4"] == {"model.name": "m", "model.version": "4", "model.owner": "team",
                          "model.labels.stage": "prod"}
    assert found["5"]["model.owner"] == ""
    for text in bad.values():
        with pytest.raises(ModelUnavailable):
            parse_metadata(text.encode())
