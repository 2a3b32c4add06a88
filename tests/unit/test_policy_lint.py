"""`gateway policy check` warnings, case files checked against the policy, and the policy
commands' --json, -v, --diff, --models and exit codes (through the real CLI entry point)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gateway.policy import PolicyError, compile_directory, load_cases
from gateway.policy._condition import parse_condition
from gateway.policy._lint import implies, lint
from tests.e2e.test_policy_cli import _in_repository, run  # noqa: F401 - fixture
from tests.unit.test_policy_engine import DEMO, write_policy

SCORER = "spiffe://demo.local/svc/scorer"


def kinds(tmp_path, policy: str) -> list[tuple[str, int, int | None]]:
    snapshot = compile_directory(write_policy(tmp_path, policy), run_tests=False)
    return [(f.kind, f.line, f.other) for f in lint(snapshot)]


G = "g, spiffe://demo.local/svc/a, role:a\n"


# --- one test per class of logic mistake --------------------------------------------------


def test_duplicate_rule(tmp_path):
    assert kinds(tmp_path, G + "p, role:a, m, infer, allow\np, role:a, m, infer, allow\n") == \
        [("duplicate", 3, 2)]


def test_allow_redundant_by_an_unconditional_or_wider_allow(tmp_path):
    policy = G + ("p, role:a, *, infer, allow\n"
                  "p, role:a, m, infer, allow, model.labels.stage == 'prod'\n"
                  "p, role:a, n:2, infer, allow\n")
    assert kinds(tmp_path, policy) == [("redundant", 3, 2), ("redundant", 4, 2)]


def test_allow_redundant_through_a_role_the_subject_holds(tmp_path):
    policy = G + "g, role:a, role:base\np, role:base, m, ready, allow\np, role:a, m, ready, allow\n"
    assert kinds(tmp_path, policy) == [("redundant", 4, 3)]


def test_allow_fully_shadowed_by_a_deny(tmp_path):
    policy = G + ("p, role:a, demo-*, infer, deny\n"
                  "p, role:a, demo-mlp, infer, allow\n"
                  "p, role:a, other, infer, allow\n")
    assert kinds(tmp_path, policy) == [("shadowed", 3, 2)]


def test_a_conditional_deny_shadows_only_allows_whose_condition_implies_it(tmp_path):
    policy = G + ("p, role:a, m, infer, deny, request.batch_size > 8\n"
                  "p, role:a, m, infer, allow, request.batch_size > 16\n"
                  "p, role:a, m, ready, allow, request.batch_size > 4\n"
                  "p, role:a, m, infer, allow, request.batch_size > 4\n")
    assert kinds(tmp_path, policy) == [("shadowed", 3, 2)]


def test_rule_for_a_role_no_identity_holds(tmp_path):
    policy = ("g, spiffe://demo.local/svc/a, role:a\ng, role:a, role:nested\n"
              "g, role:orphan-parent, role:orphan\n"
              "p, role:nested, m, infer, allow\n"       # held through role:a
              "p, role:orphan, m, infer, allow\n"       # only another unheld role has it
              "p, role:typo, m, ready, allow\n"
              "p, spiffe://demo.local/svc/b, m, infer, allow\n")  # an identity: fine
    assert kinds(tmp_path, policy) == [("unassigned-role", 5, None),
                                       ("unassigned-role", 6, None)]


@pytest.mark.parametrize("condition", [
    "request.hour > 24",
    "request.hour < 0",
    "caller.id == 'a' && caller.id == 'b'",
    "request.batch_size > 8 && request.batch_size < 4",
    "model.labels.stage in ('a', 'b') && model.labels.stage == 'c'",
    "anomaly.score > 0.9 && !(anomaly.score > 0.5)",
    "false",
])
def test_conditions_that_can_never_be_true(tmp_path, condition):
    assert kinds(tmp_path, G + f"p, role:a, m, infer, allow, {condition}\n") == \
        [("never-true", 2, None)]


@pytest.mark.parametrize("condition", [
    "request.hour >= 23",
    "request.hour == 0 || caller.id == 'x'",
    "request.batch_size > 8 && request.batch_size < 10",
    "anomaly.score > 0.5 && anomaly.score < 0.6",
    "globMatch(model.labels.stage, 'p*') && model.labels.stage != 'prod'",
    "caller.id == caller.path",   # two attributes: never judged
])
def test_satisfiable_conditions_draw_no_warning(tmp_path, condition):
    assert kinds(tmp_path, G + f"p, role:a, m, infer, allow, {condition}\n") == []


def test_the_shipped_policy_has_no_warning():
    assert lint(compile_directory(DEMO, run_tests=False)) == []


def test_implication_is_exact_for_comparisons():
    a, b = parse_condition("request.batch_size >= 9"), parse_condition("request.batch_size > 8")
    assert implies(a, b) and implies(b, a)  # integers: the same set
    assert not implies(parse_condition("anomaly.x > 8"), parse_condition("anomaly.x >= 9"))
    assert implies(a, None) and not implies(None, a)
    # A request may lack an attribute, and then a condition naming it is false as a whole.
    assert not implies(parse_condition("request.batch_size > 1"),
                       parse_condition("request.batch_size > 0 || model.labels.x == 'y'"))


def test_check_prints_warnings_naming_both_rules_and_strict_fails(tmp_path, capsys):
    directory = write_policy(tmp_path, G + "p, role:a, m, infer, allow\n"
                             "p, role:a, m, infer, allow\n")
    code, out, err = run(capsys, "check", directory)
    assert code == 0 and err == ""
    assert (f"{directory}/policy.csv:3: warning: duplicate of {directory}/policy.csv:2: "
            "p, role:a, m, infer, allow [duplicate]") in out
    assert "1 warning(s)" in out
    code, _, _ = run(capsys, "check", directory, "--strict")
    assert code == 1
    code, out, _ = run(capsys, "check", directory, "--strict", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["warnings"] == [{"file": f"{directory}/policy.csv", "line": 3,
                                   "kind": "duplicate", "message": report["warnings"][0]
                                   ["message"], "other": f"{directory}/policy.csv:2"}]


def test_check_json_reports_errors_with_paths_relative_to_the_working_directory(
        tmp_path, capsys, monkeypatch):
    write_policy(tmp_path / "pol", "p, alice, m, infr, allow\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "check", "pol", "--json")
    report = json.loads(out)
    assert code == 2 and report["ok"] is False
    (error,) = report["errors"]
    assert (error["file"], error["line"]) == ("pol/policy.csv", 1)
    assert "unknown action 'infr'; did you mean 'infer'?" in error["message"]
    code, out, err = run(capsys, "check", "pol")
    assert code == 2 and out == "" and err.startswith("gateway: error: pol/policy.csv:1: ")


# --- test cases mean something ---------------------------------------------------------


CASES_POLICY = G + "p, role:a, m, infer, allow, model.labels.stage == 'prod'\n"


@pytest.mark.parametrize(("case", "line", "message"), [
    ("    action: infr\n    expect: deny\n", 5, "unknown action 'infr'; did you mean 'infer'?"),
    ("    action: infer\n    attributes: {model.labels.stag: prod}\n    expect: deny\n", 6,
     "attribute model.labels.stag is read by no rule of this policy; did you mean "
     "'model.labels.stage'?"),
    ("    action: infer\n    attributes: {request.batch_size: many}\n    expect: deny\n", 6,
     "attribute request.batch_size is a number, not a string"),
    ("    action: infer\n    attributes: {model.lables.stage: prod}\n    expect: deny\n", 6,
     "unknown attribute 'model.lables.stage'"),
    ("    action: infer\n    expect: deny\n    rule: policy.csv:9\n", 7,
     "rule 'policy.csv:9' names no rule of this policy"),
])
def test_meaningless_cases_are_errors_at_their_line(tmp_path, capsys, case, line, message):
    directory = write_policy(tmp_path, CASES_POLICY)
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - caller: spiffe://demo.local/svc/a\n    model: m\n"
                     "    name: x\n" + case)
    code, out, err = run(capsys, "test", directory, cases)
    assert code == 2 and out == ""
    assert f"{cases}:{line}: {message}" in err
    with pytest.raises(PolicyError):  # the reload path uses the same loader
        load_cases([cases], compile_directory(directory, run_tests=False))


def test_a_meaningless_shipped_case_blocks_the_reload(tmp_path):
    directory = write_policy(tmp_path, CASES_POLICY, cases=(
        "cases:\n  - {caller: spiffe://demo.local/svc/a, model: m, action: infr, "
        "expect: deny}\n"))
    with pytest.raises(PolicyError) as info:
        compile_directory(directory)
    assert "tests/cases.yaml:2: unknown action 'infr'" in str(info.value)


def shipped_cases() -> int:
    """How many test cases the shipped policy has (counted from its files, not a constant)."""
    return sum(len(yaml.safe_load(f.read_text())["cases"])
               for f in (Path(DEMO) / "tests").glob("*.yaml"))


def shipped_rules() -> int:
    """How many ``p`` rules the shipped policy.csv holds."""
    return sum(1 for line in (Path(DEMO) / "policy.csv").read_text().splitlines()
               if line.strip().startswith("p,"))


def test_test_verbose_lists_every_case_with_its_rule_and_json(capsys):
    code, out, _ = run(capsys, "test", DEMO, "-v")
    assert code == 0
    listed = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(listed) == shipped_cases() and all(line.startswith("PASS policies/tests/demo.yaml:")
                                     for line in listed)
    assert ("PASS policies/tests/demo.yaml:3 [scorer infers on demo-mlp]: "
            f"{SCORER} infer demo-mlp: allow by policies/policy.csv:7") in listed
    code, out, _ = run(capsys, "test", DEMO, "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"] == report["total"] == shipped_cases()
    first = report["cases"][0]
    assert (first["where"], first["rule"], first["passed"]) == \
        ("policies/tests/demo.yaml:3", "policies/policy.csv:7", True)


def test_test_json_marks_a_failure(tmp_path, capsys):
    directory = write_policy(tmp_path, G + "p, role:a, m, infer, allow\n")
    cases = tmp_path / "c.yaml"
    cases.write_text("cases:\n  - {caller: spiffe://demo.local/svc/a, model: m, "
                     "action: infer, expect: deny}\n")
    code, out, _ = run(capsys, "test", directory, cases, "--json")
    report = json.loads(out)
    assert code == 1 and report["passed"] == 0
    assert report["cases"][0]["passed"] is False and report["cases"][0]["got"] == "allow"


# --- explain, fmt, diff ------------------------------------------------------------------


def test_explain_reads_model_labels_as_the_server_would(tmp_path, capsys):
    repo = tmp_path / "models"
    (repo / "demo-mlp" / "1").mkdir(parents=True)
    (repo / "demo-mlp" / "2").mkdir(parents=True)
    (repo / "demo-mlp" / "1" / "metadata.toml").write_text('[labels]\nstage = "retired"\n')
    (repo / "demo-mlp" / "2" / "metadata.toml").write_text('[labels]\nstage = "production"\n')
    base = ("explain", DEMO, "--as", SCORER, "--model", "demo-mlp", "--action", "infer",
            "--models", repo)
    code, out, _ = run(capsys, *base, "--version", "1")
    assert code == 1 and out.startswith("decision: DENY by policies/policy.csv:13")
    code, out, err = run(capsys, *base, "--json")  # the latest version: 2
    report = json.loads(out)
    assert code == 0 and report["decision"] == "allow"
    assert report["attributes"]["model.labels.stage"] == "production"
    assert "version 2, the latest" in err


def test_explain_rejects_unknown_actions_and_attributes(capsys):
    code, out, err = run(capsys, "explain", DEMO, "--as", SCORER, "--action", "infr")
    assert code == 2 and out == "" and "did you mean 'infer'?" in err
    code, _, err = run(capsys, "explain", DEMO, "--as", SCORER, "--action", "infer",
                       "--attr", "request.batchsize=3")
    assert code == 2 and "did you mean 'request.batch_size'?" in err


def test_fmt_diff_shows_the_change_and_changes_nothing(tmp_path, capsys):
    directory = write_policy(tmp_path, "p,alice ,m,infer,allow\n")
    code, out, _ = run(capsys, "fmt", directory, "--diff")
    assert code == 1
    assert "-p,alice ,m,infer,allow\n+p, alice, m, infer, allow\n" in out
    assert (directory / "policy.csv").read_text() == "p,alice ,m,infer,allow\n"
    run(capsys, "fmt", directory)
    assert run(capsys, "fmt", directory, "--diff") == (0, "", "")


def test_diff_json(tmp_path, capsys):
    old = write_policy(tmp_path / "old", "p, alice, m, infer, allow\n")
    new = write_policy(tmp_path / "new", "p, alice, m, infer, allow\np, bob, m, infer, allow\n")
    code, out, _ = run(capsys, "diff", old, new, "--json", "--models", tmp_path / "none",
                       "--exit-code")
    report = json.loads(out)
    assert code == 1
    assert report["changes"] == [{"change": "gained", "subject": "bob", "model": "m",
                                  "version": None, "action": "infer",
                                  "old_rule": "default-deny", "new_rule": "policy.csv:2"}]


def test_explain_trace_lists_every_rule_and_why(capsys):
    code, out, _ = run(capsys, "explain", DEMO, "--as", SCORER, "--model", "demo-mlp",
                       "--action", "infer", "--attr", "model.labels.stage=retired", "--trace")
    assert code == 1
    trace = out.split("trace (every rule, in file order):\n")[1]
    assert "  policies/policy.csv:7: MATCH allow: p, role:scorers, demo-mlp, infer, allow" in trace
    assert "  policies/policy.csv:13: MATCH deny: " in trace
    assert "  policies/policy.csv:5: no: p, role:scorers, demo-mlp, ready, allow\n" \
           "    action: infer is not ready" in trace
    code, out, _ = run(capsys, "explain", DEMO, "--as", SCORER, "--model", "demo-mlp",
                       "--action", "infer", "--json")
    trace = json.loads(out)["trace"]
    assert len(trace) == shipped_rules() and [t["where"] for t in trace if t["matches"]] == \
        ["policies/policy.csv:7"]
