"""Shadow mode end to end: [policy] shadow in the config, disagreements counted by live and
shadow rule in the metrics, summarised in the audit log, reported by `gateway policy
shadow-report`, and set or cleared at run time through PolicyAdmin.SetShadowPolicy."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.devenv import REPO, make_demo_env, run_cli, start_gateway
from gateway.policy import PolicyError, PolicyStore, ShadowCollector
from tests.conftest import assert_records_match_schema, channel_credentials
from tests.unit.test_policy_engine import write_policy

SCORER = "spiffe://demo.local/svc/scorer"

# The candidate: scorers lose infer on demo-types (a deny at line 27), auditors gain metadata
# on demo-mlp (line 28); the rest is the shipped policy.
CANDIDATE_EXTRA = ("p, role:scorers, demo-types, infer, deny\n"
                   "p, role:auditors, demo-mlp, metadata, allow\n")


def candidate_dir(root):
    directory = root / "candidate"
    shutil.copytree(REPO / "policies", directory)
    shutil.rmtree(directory / "tests")  # the shipped cases expect the live behaviour
    with open(directory / "policy.csv", "a") as f:
        f.write(CANDIDATE_EXTRA)
    return directory


def candidate_lines(directory) -> tuple[str, str]:
    lines = (directory / "policy.csv").read_text().splitlines()
    deny = lines.index(CANDIDATE_EXTRA.splitlines()[0]) + 1
    return f"policy.csv:{deny}", f"policy.csv:{deny + 1}"


# --- in the store ---------------------------------------------------------------------------


def test_store_counts_by_rule_pair_and_request_and_summarises(tmp_path):
    summaries: list[dict] = []
    live = write_policy(tmp_path / "live", "p, alice, m, infer, allow\n")
    cand = write_policy(tmp_path / "cand", "p, alice, m, infer, deny\np, bob, m, infer, allow\n")
    store = PolicyStore.load(live, shadow=cand, on_shadow_summary=summaries.append,
                             shadow_summary_interval=0)
    assert [s["final"] for s in summaries] == [False]  # one on set
    for _ in range(3):
        assert store.decide("alice", "m", "infer").allowed  # the live answer
    assert not store.decide("bob", "m", "infer").allowed
    store.decide("carol", "m", "infer")  # both deny: no disagreement
    report = store.shadow_report()
    assert (report["decisions"], report["disagreements"]) == (5, 4)
    assert report["by_rule"] == [
        {"live_rule": "policy.csv:1", "shadow_rule": "policy.csv:1", "change": "revoke",
         "count": 3},
        {"live_rule": "default-deny", "shadow_rule": "policy.csv:2", "change": "grant",
         "count": 1}]
    assert {(r["subject"], r["change"], r["count"]) for r in report["by_request"]} == \
        {("alice", "revoke", 3), ("bob", "grant", 1)}
    registry = CollectorRegistry()
    registry.register(ShadowCollector(lambda: store.shadow))
    text = generate_latest(registry).decode()
    assert ('gateway_policy_shadow_disagreements_total{change="revoke",live_rule="policy.csv:1",'
            'shadow_rule="policy.csv:1"} 3.0') in text
    assert "gateway_policy_shadow_decisions_total 5.0" in text
    final = store.clear_shadow()
    assert summaries[-1] is not None and summaries[-1]["final"] is True
    assert final["disagreements"] == 4 and summaries[-1]["by_rule"] == report["by_rule"]
    assert "gateway_policy_shadow_active 0.0" in generate_latest(registry).decode()


def test_a_candidate_is_checked_and_tested_like_a_reload(tmp_path):
    store = PolicyStore.load(write_policy(tmp_path / "live", "p, alice, m, infer, allow\n"))
    bad = write_policy(tmp_path / "bad", "p, alice, m, infr, allow\n")
    with pytest.raises(PolicyError, match="unknown action 'infr'"):
        store.load_shadow(bad)
    failing = write_policy(tmp_path / "failing", "p, alice, m, infer, allow\n", cases=(
        "cases:\n  - {caller: alice, model: m, action: infer, expect: deny}\n"))
    with pytest.raises(PolicyError, match="test case failed"):
        store.load_shadow(failing)
    assert store.shadow is None


def test_periodic_summaries_only_when_there_are_new_disagreements(tmp_path):
    summaries: list[dict] = []
    arrived = threading.Event()

    def record(summary: dict) -> None:
        summaries.append(summary)
        if summary["disagreements"]:
            arrived.set()

    store = PolicyStore.load(write_policy(tmp_path / "live", "p, alice, m, infer, allow\n"),
                             shadow=write_policy(tmp_path / "c", "p, bob, m, infer, allow\n"),
                             on_shadow_summary=record, shadow_summary_interval=0.05)
    store.decide("alice", "m", "infer")
    assert arrived.wait(10)
    count = len(summaries)
    store.clear_shadow()
    assert len(summaries) == count + 1 and summaries[-1]["final"]
    assert sum(1 for s in summaries if not s["final"]) == 2  # on set, then one periodic


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shadow_gw(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow")
    candidate = candidate_dir(root)
    env = make_demo_env(root / "env", policy={"shadow": str(candidate),
                                              "shadow_summary_interval": 3600.0})
    gw = start_gateway(env)
    yield gw, candidate
    gw.stop()


def cli(gw, *args: str, check: bool = True):
    return run_cli(*args, "--config", str(gw.env.config), "--target", gw.target, check=check)


def audit_records(gw) -> list[dict]:
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "auditor")) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        size = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest()).size
        entries = stub.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=size + 10_000))
    return [json.loads(e) for e in entries.entries]


def metrics(gw) -> str:
    with urllib.request.urlopen(gw.metrics_url, timeout=10) as response:
        return response.read().decode()


def test_shadow_from_config_to_metrics_audit_and_report(shadow_gw):
    gw, candidate = shadow_gw
    deny_line, grant_line = candidate_lines(candidate)
    for _ in range(2):  # allowed live, revoked by the shadow: answers unchanged
        cli(gw, "call", "demo-types", "--as", "scorer", "--example")
    proc = cli(gw, "call", "demo-mlp", "--as", "auditor", "--action", "metadata", check=False)
    assert proc.returncode == 1  # live denies; the shadow would grant
    cli(gw, "call", "demo-mlp", "--as", "scorer", "--example")  # both allow

    text = metrics(gw)
    assert ('gateway_policy_shadow_disagreements_total{change="revoke",live_rule="policy.csv:10"'
            f',shadow_rule="{deny_line}"}} 2.0') in text
    assert ('gateway_policy_shadow_disagreements_total{change="grant",live_rule="default-deny",'
            f'shadow_rule="{grant_line}"}} 1.0') in text

    report = json.loads(cli(gw, "policy", "shadow-report", "--as", "auditor",
                            "--json").stdout)
    assert report["active"] and report["disagreements"] == 3
    rows = {(r["subject"], r["model"], r["action"], r["change"]): r["count"]
            for r in report["by_request"]}
    assert rows == {(SCORER, "demo-types", "infer", "revoke"): 2,
                    ("spiffe://demo.local/team/audit/auditor", "demo-mlp", "metadata",
                     "grant"): 1}
    text_report = cli(gw, "policy", "shadow-report", "--as", "auditor").stdout
    assert f"- {SCORER} infer demo-types  x2  (live policy.csv:10, shadow {deny_line})" \
        in text_report
    assert cli(gw, "policy", "shadow-report", "--as", "auditor", "--exit-code",
               check=False).returncode == 1

    proc = cli(gw, "policy", "shadow", "--clear", "--as", "admin")
    assert "3 disagreement(s)" in proc.stdout
    records = audit_records(gw)
    assert_records_match_schema(records)
    summaries = [r for r in records if r.get("kind") == "policy_shadow"]
    assert summaries[0]["final"] is False and summaries[0]["directory"] == str(candidate)
    assert summaries[-1]["final"] is True and summaries[-1]["disagreements"] == 3
    assert {(p["live_rule"], p["shadow_rule"], p["change"], p["count"])
            for p in summaries[-1]["by_rule"]} == {("policy.csv:10", deny_line, "revoke", 2),
                                                   ("default-deny", grant_line, "grant", 1)}
    assert "gateway_policy_shadow_active 0.0" in metrics(gw)
    assert json.loads(cli(gw, "policy", "shadow-report", "--as", "auditor",
                          "--json").stdout)["active"] is False

    # Set again at run time from the configured directory (an empty request).
    proc = cli(gw, "policy", "shadow", "--as", "admin", "--json")
    assert json.loads(proc.stdout)["directory"] == str(candidate)
    assert "gateway_policy_shadow_active 1.0" in metrics(gw)


def test_set_shadow_rejects_a_bad_candidate_and_needs_policy_load(shadow_gw):
    gw, _ = shadow_gw
    bad = write_policy(gw.env.policies.parent / "bad", "p, role:scorers, demo-mlp, infr, allow\n")
    proc = cli(gw, "policy", "shadow", str(bad), "--as", "admin", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "FAILED_PRECONDITION" in proc.stderr and "unknown action 'infr'" in proc.stderr
    proc = cli(gw, "policy", "shadow", "--clear", "--as", "scorer", check=False)
    assert proc.returncode == 1 and "policy.load on @gateway" in proc.stderr
    proc = cli(gw, "policy", "shadow-report", "--as", "scorer", check=False)
    assert proc.returncode == 1 and "policy.read on @gateway" in proc.stderr


def test_set_shadow_is_confined_to_the_shadow_root(shadow_gw, tmp_path):
    """An admin's SetShadowPolicy cannot read, or learn anything about, paths outside
    [policy] shadow_root (default: the directory holding the policy directory): a real policy
    directory, a missing path, and a symbolic link out of the tree are refused alike."""
    gw, _ = shadow_gw
    outside = write_policy(tmp_path / "outside", "p, role:scorers, demo-mlp, infer, allow\n")
    link = gw.env.policies.parent / "link-out"
    link.symlink_to(outside)
    before = len(audit_records(gw))
    answers = set()
    for target in (outside, tmp_path / "missing", gw.env.policies.parent / ".." / "x", link):
        proc = cli(gw, "policy", "shadow", str(target), "--as", "admin", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "PERMISSION_DENIED" in proc.stderr
        answers.add(proc.stderr.split(" (audit receipt")[0])
    assert len(answers) == 1  # nothing tells an existing directory from a missing path
    denied = [r for r in audit_records(gw)[before:] if r.get("rpc") == "SetShadowPolicy"]
    assert [(r["decision"], r["reason"], r["status"]) for r in denied] == \
        [("deny", "shadow-root", "PERMISSION_DENIED")] * 4
    report = json.loads(cli(gw, "policy", "shadow-report", "--as", "auditor", "--json").stdout)
    assert report.get("directory") != str(outside)
