"""Differential test: the compiled engine against casbin ``enforce`` on random RBAC policies.

Random policies have roles with hierarchy (depth below casbin's limit of 10), globs through
``globMatch`` or ``keyMatch``, allow and deny rules under the allow-and-deny effect, on which
casbin's semantics are ours. Where they are not, the divergence is pinned by its own test.
"""

from __future__ import annotations

import random
from pathlib import Path

import casbin
import pytest

from gateway.policy import ACTIONS, DEFAULT_DENY, compile_directory
from tests.unit.test_policy_engine import RBAC_DENY_MODEL, write_policy

USERS = [f"spiffe://t.local/svc/u{i}" for i in range(12)] + ["cn:legacy"]
ROLES = [f"role:r{i}" for i in range(8)]
MODELS = ["demo-mlp", "demo-types", "demo-x1", "fraud-v1", "fraud-v2", "m1", "m2", "mx",
          "risk", "@gateway"]
GLOBS = ["*", "demo-*", "fraud-v?", "m[12]", "m[!1]", "fraud-*", "demo-?lp", "risk*", "d*"]
KEYS = ["*", "demo-*", "fraud-*", "m*", "risk*", "d*"]


def random_policy(rng: random.Random, patterns: list[str], actions: list[str]) -> str:
    lines = []
    for role in ROLES:  # hierarchy: r_i may inherit r_j only for j > i, so no cycles
        i = ROLES.index(role)
        for parent in ROLES[i + 1:]:
            if rng.random() < 0.18:
                lines.append(f"g, {role}, {parent}")
    for user in USERS:
        for role in rng.sample(ROLES, rng.randint(0, 2)):
            lines.append(f"g, {user}, {role}")
    for _ in range(rng.randint(30, 90)):
        subject = rng.choice(ROLES) if rng.random() < 0.7 else rng.choice(USERS)
        obj = rng.choice(patterns) if rng.random() < 0.4 else rng.choice(MODELS)
        action = rng.choice(actions)
        effect = "deny" if rng.random() < 0.25 else "allow"
        lines.append(f"p, {subject}, {obj}, {action}, {effect}")
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("matcher", ["globMatch", "keyMatch"])
def test_decisions_equal_casbin_enforce_on_random_policies(tmp_path, matcher):
    rng = random.Random(20261129 + len(matcher))
    patterns = GLOBS if matcher == "globMatch" else KEYS
    model = RBAC_DENY_MODEL.format(obj=matcher)
    compared = allowed = denied_by_rule = 0
    for n in range(8):
        actions = rng.sample(ACTIONS, 3)  # a few actions per policy: dense enough to allow
        directory = write_policy(tmp_path / f"p{n}", random_policy(rng, patterns, actions),
                                 model)
        ours = compile_directory(directory)
        theirs = casbin.Enforcer(str(directory / "model.conf"), str(directory / "policy.csv"))
        for _ in range(700):
            subject = rng.choice(USERS + ROLES + ["spiffe://t.local/svc/stranger"])
            obj = rng.choice([*MODELS, "unknown", "demo-mlp-2"])
            action = rng.choice(actions) if rng.random() < 0.9 else rng.choice(ACTIONS)
            got = ours.decide(subject, obj, action)
            want = theirs.enforce(subject, obj, action)
            assert got.allowed == want, (directory, subject, obj, action, got)
            compared += 1
            allowed += got.allowed
            denied_by_rule += not got.allowed and got.rule != DEFAULT_DENY
    # The comparison is only meaningful if both outcomes, and deny rules, occur often.
    assert compared >= 5600
    assert 0.1 * compared < allowed < 0.9 * compared
    assert denied_by_rule > 0.02 * compared


def test_at_least_ten_thousand_requests_are_compared():
    # Two matcher kinds x 8 policies x 700 requests (the test above).
    assert 2 * 8 * 700 >= 10_000


def test_divergence_unmatched_request_under_deny_override_effect(tmp_path):
    """casbin's ``!some(where (p.eft == deny))`` allows a request matching no rule; we deny."""
    model = RBAC_DENY_MODEL.format(obj="globMatch").replace(
        "some(where (p.eft == allow)) && !some(where (p.eft == deny))",
        "!some(where (p.eft == deny))")
    directory = write_policy(tmp_path, "p, alice, m, infer, deny\np, bob, m, infer, allow\n",
                             model)
    theirs = casbin.Enforcer(str(directory / "model.conf"), str(directory / "policy.csv"))
    ours = compile_directory(directory)
    assert theirs.enforce("mallory", "m", "infer") is True       # casbin: unmatched -> allow
    assert ours.decide("mallory", "m", "infer").allowed is False  # ours: default deny
    for request in (("alice", "m", "infer"), ("bob", "m", "infer")):  # matched: the same
        assert ours.decide(*request).allowed == theirs.enforce(*request)


def test_divergence_pycasbin_glob_skips_the_character_after_a_star(tmp_path):
    """pycasbin 1.43 ``globMatch("demo-mlp", "d*x*p")`` is true; the glob means false."""
    model = RBAC_DENY_MODEL.format(obj="globMatch")
    directory = write_policy(tmp_path, "p, alice, d*x*p, infer, allow\n"
                             "p, alice, *-mlp, ready, allow\n", model)
    theirs = casbin.Enforcer(str(directory / "model.conf"), str(directory / "policy.csv"))
    ours = compile_directory(directory)
    assert theirs.enforce("alice", "demo-mlp", "infer") is True
    assert ours.decide("alice", "demo-mlp", "infer").allowed is False
    assert ours.decide("alice", "dxp", "infer").allowed is True
    assert ours.decide("alice", "demo-mlp", "ready").allowed is True
    assert ours.decide("alice", "demo-mlpx", "ready").allowed is False


def test_divergence_casbin_silently_drops_mistyped_rule_types(tmp_path):
    model = RBAC_DENY_MODEL.format(obj="globMatch")
    directory = write_policy(tmp_path, "p, alice, m, infer, allow\n"
                             "pp, alice, m, infer, deny\n", model)
    theirs = casbin.Enforcer(str(directory / "model.conf"), str(directory / "policy.csv"))
    assert theirs.enforce("alice", "m", "infer") is True  # the deny line vanished
    with pytest.raises(Exception) as info:
        compile_directory(directory)
    assert "policy.csv:2: unknown rule type 'pp'" in str(info.value)


def test_shipped_demo_policy_model_is_readable_by_casbin():
    # The shipped files stay in casbin's format (a security team's existing tools read them).
    root = Path(__file__).resolve().parents[2] / "policies"
    model = casbin.Enforcer(str(root / "model.conf"), str(root / "policy.csv")).get_model()
    assert len(model["p"]["p"].policy) == len(compile_directory(root).source.rules)
