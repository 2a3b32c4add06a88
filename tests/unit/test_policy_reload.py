"""Hot reload and shadow mode: atomic swaps under concurrent decisions, every attempt reported.

Worker threads decide at full speed while the main thread reloads a broken and then a good
policy. Every decision names the digest of the policy that made it, so each one is checked
against the expected answer *of that policy*: a torn read (half old, half new) would show
up as a wrong decision, and a blocked or failed one as an exception.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gateway.policy import PolicyError, PolicyStore, ReloadResult
from tests.unit.test_policy_engine import write_policy

CASES_A = """\
cases:
  - {caller: alice, model: m1, action: infer, expect: allow}
"""

POLICY_A = """\
p, role:readers, m*, ready, allow
p, role:scorers, m1, infer, allow
p, role:scorers, m2, infer, allow
p, role:scorers, m3, infer, deny
g, alice, role:scorers
g, role:scorers, role:readers
g, bob, role:readers
"""

# B moves bob into scorers, denies m1 to everyone in scorers and opens m3: many answers flip.
POLICY_B = """\
p, role:readers, m*, ready, allow
p, role:scorers, m1, infer, deny
p, role:scorers, m2, infer, allow
p, role:scorers, m3, infer, allow
g, alice, role:scorers
g, role:scorers, role:readers
g, bob, role:scorers
"""

CASES_B = """\
cases:
  - {caller: bob, model: m3, action: infer, expect: allow}
"""

BROKEN = POLICY_A + "p, role:scorers, m4, infer, allow, True) || (True\n"

REQUESTS = [(s, m, a) for s in ("alice", "bob", "carol", "role:scorers")
            for m in ("m1", "m2", "m3", "x") for a in ("infer", "ready")]


def expected(directory: Path, policy: str, cases: str) -> dict[tuple[str, str, str], bool]:
    """Answers of a policy, from a separately loaded store."""
    store = PolicyStore.load(write_policy(directory, policy, cases=cases))
    return {r: store.decide(*r).allowed for r in REQUESTS}


def test_reload_under_concurrent_decisions(tmp_path):
    answers_a = expected(tmp_path / "a", POLICY_A, CASES_A)
    answers_b = expected(tmp_path / "b", POLICY_B, CASES_B)
    assert sum(answers_a[r] != answers_b[r] for r in REQUESTS) >= 6  # the swap is visible

    live = write_policy(tmp_path / "live", POLICY_A, cases=CASES_A)
    attempts: list[ReloadResult] = []
    store = PolicyStore.load(live, on_reload=attempts.append)
    digest_a = store.digest
    digest_b = PolicyStore.load(tmp_path / "b").digest
    by_digest = {digest_a: answers_a, digest_b: answers_b}

    stop = threading.Event()
    errors: list[BaseException] = []
    wrong: list[tuple] = []
    counts = [0] * 4
    warmed = [threading.Event() for _ in counts]
    seen_b = [threading.Event() for _ in counts]

    def worker(k: int) -> None:
        try:
            n = 0
            while not stop.is_set():
                request = REQUESTS[n % len(REQUESTS)]
                d = store.decide(*request)
                answers = by_digest.get(d.policy_digest)
                if answers is None or answers[request] != d.allowed:
                    wrong.append((request, d))
                if d.policy_digest == digest_b:
                    seen_b[k].set()
                n += 1
                if n == 2000:
                    warmed[k].set()
            counts[k] = n
        except BaseException as err:  # any exception is a failure of the test
            errors.append(err)
            warmed[k].set()
            seen_b[k].set()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(counts))]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(30) for e in warmed)
        for _ in range(3):  # a broken policy, several times: rejected, A keeps serving
            (live / "policy.csv").write_text(BROKEN)
            result = store.reload("test: broken")
            assert not result.accepted and store.digest == digest_a
        # Then good policies, back and forth: each swap retires (dismantles) the old one
        # while workers may still be deciding on it.
        for policy, cases, digest in ((POLICY_B, CASES_B, digest_b), (POLICY_A, CASES_A, digest_a),
                                      (POLICY_B, CASES_B, digest_b)):
            (live / "policy.csv").write_text(policy)
            (live / "tests" / "cases.yaml").write_text(cases)
            result = store.reload("test: good")
            assert result.accepted and store.digest == digest
        assert all(e.wait(30) for e in seen_b)  # every worker decided under B afterwards
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert wrong == []
    assert sum(counts) > 8000

    assert [r.accepted for r in attempts] == [False, False, False, True, True, True]
    rejected = attempts[0]
    assert rejected.old_digest == digest_a and rejected.new_digest not in ("", digest_a)
    assert "policy.csv:8" in rejected.error and rejected.reason == "test: broken"
    assert [(r.old_digest, r.new_digest) for r in attempts[3:]] == \
        [(digest_a, digest_b), (digest_b, digest_a), (digest_a, digest_b)]


def test_reload_rejected_when_the_policys_own_test_cases_fail(tmp_path):
    live = write_policy(tmp_path, POLICY_A, cases=CASES_A)
    attempts: list[ReloadResult] = []
    store = PolicyStore.load(live, on_reload=attempts.append)
    before = store.digest
    (live / "policy.csv").write_text(POLICY_B)  # valid, but alice loses m1: CASES_A fails
    result = store.reload("cases")
    assert not result.accepted
    assert "test case failed" in result.error and "alice infer m1" in result.error
    assert store.digest == before and store.decide("alice", "m1", "infer").allowed
    assert attempts == [result]


def test_load_refuses_an_invalid_policy(tmp_path):
    with pytest.raises(PolicyError) as info:
        PolicyStore.load(write_policy(tmp_path, BROKEN))
    assert "policy.csv:8" in str(info.value)
    with pytest.raises(PolicyError):
        PolicyStore.load(tmp_path / "absent")


def test_watcher_reloads_on_file_change_and_reports_every_attempt(tmp_path):
    live = write_policy(tmp_path, POLICY_A, cases=CASES_A)
    attempts: list[ReloadResult] = []
    arrived = threading.Condition()

    def on_reload(result: ReloadResult) -> None:
        with arrived:
            attempts.append(result)
            arrived.notify_all()

    store = PolicyStore.load(live, on_reload=on_reload)
    first = store.digest
    store.start_watching(0.02)
    try:
        (live / "policy.csv").write_text(BROKEN)
        with arrived:
            assert arrived.wait_for(lambda: len(attempts) >= 1, timeout=30)
        assert not attempts[0].accepted and attempts[0].reason == "file change"
        assert store.digest == first

        (live / "policy.csv").write_text(POLICY_B)
        (live / "tests" / "cases.yaml").write_text(CASES_B)
        with arrived:
            assert arrived.wait_for(lambda: any(r.accepted for r in attempts), timeout=30)
        assert store.digest != first
        assert store.decide("bob", "m3", "infer").allowed
    finally:
        store.stop_watching()
    assert all(r.reason == "file change" for r in attempts)


def test_on_reload_failure_does_not_undo_or_break_a_reload(tmp_path):
    live = write_policy(tmp_path, POLICY_A)

    def explode(result: ReloadResult) -> None:
        raise RuntimeError("audit sink down")

    store = PolicyStore.load(live, on_reload=explode)
    (live / "policy.csv").write_text(POLICY_B)
    assert store.reload().accepted
    assert store.decide("bob", "m3", "infer").allowed


def test_shadow_mode_counts_disagreements_without_changing_answers(tmp_path):
    store = PolicyStore.load(write_policy(tmp_path / "live", POLICY_A))
    candidate = write_policy(tmp_path / "candidate", POLICY_B)
    assert store.shadow_stats() is None
    digest = store.load_shadow(candidate)
    answers_a = {r: PolicyStore.load(tmp_path / "live").decide(*r).allowed for r in REQUESTS}
    answers_b = {r: PolicyStore.load(candidate).decide(*r).allowed for r in REQUESTS}
    for request in REQUESTS:
        assert store.decide(*request).allowed == answers_a[request]  # live answers only
    stats = store.shadow_stats()
    assert stats["shadow_digest"] == digest and stats["decisions"] == len(REQUESTS)
    grants = sum(answers_b[r] and not answers_a[r] for r in REQUESTS)
    revokes = sum(answers_a[r] and not answers_b[r] for r in REQUESTS)
    assert (stats["shadow_allows_live_denies"], stats["shadow_denies_live_allows"]) == \
        (grants, revokes)
    assert stats["disagreements"] == grants + revokes > 0
    assert len(stats["samples"]) == grants + revokes
    store.clear_shadow()
    assert store.shadow_stats() is None


def test_references_include_the_shadow_policy(tmp_path):
    store = PolicyStore.load(write_policy(tmp_path / "live", POLICY_A))
    assert not store.references("anomaly.")
    store.load_shadow(write_policy(tmp_path / "cand", POLICY_A + "p, alice, m1, infer, deny, "
                                   "anomaly.extraction_alarm\n"))
    assert store.references("anomaly.")


def test_a_decision_overtaken_by_a_reload_is_decided_again(tmp_path):
    """A reader still inside the old snapshot when it is swapped out and dismantled must not
    return what it read there: the store sees ``retired`` and decides on the new policy."""
    live = write_policy(tmp_path, POLICY_A)
    store = PolicyStore.load(live)
    old = store.snapshot
    original = old.decide
    calls = []

    def overtaken(*args):
        calls.append(args)
        if len(calls) == 1:  # the reload lands while this decision is in progress
            (live / "policy.csv").write_text(POLICY_B)
            assert store.reload("race").accepted
        return original(*args)

    old.decide = overtaken
    d = store.decide("bob", "m3", "infer")  # denied under A, allowed under B
    assert len(calls) == 1 and old.retired
    assert old.decide("alice", "m2", "infer").allowed is False  # dismantled: would be wrong
    assert d.allowed and d.policy_digest == store.digest != old.digest
