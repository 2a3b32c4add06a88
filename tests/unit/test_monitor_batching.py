"""Scoring a batch of rows at once sees exactly what scoring them one request at a time sees.

The background scorer hands the usage tracker many requests' rows at once (and the rate
tracker their count); these tests hold the batched paths to the row-by-row ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from gateway.monitor import InputProfile
from gateway.monitor._usage import UsageTracker


def _tracker(clock: list[float]) -> UsageTracker:
    return UsageTracker(input_fpr=0.01, extraction_fpr=0.001, probe_window=64,
                        sweep_window=64, rows_per_request=10**6, rate_short_s=10.0,
                        rate_long_s=600.0, rate_floor=1.0, rate_ratio_alarm=3.0,
                        max_callers=8, clock=lambda: clock[0])


def _stream(rng: np.random.Generator, d: int, steps: int) -> list[np.ndarray]:
    """Requests of 1-30 rows: natural ones, small steps from a seed, and exact repeats."""
    out = []
    for step in range(steps):
        n = int(rng.integers(1, 30))
        if step % 3 == 0:
            rows = np.repeat(rng.normal(size=d)[None], n, axis=0)
            rows[:, 0] += np.arange(n) * 0.01
        else:
            rows = rng.normal(size=(n, d))
        if step % 7 == 0:
            rows[: n // 2] = rows[0]
        out.append(rows)
    return out


@pytest.mark.parametrize("features", [4, 40])
def test_prada_batched_equals_row_by_row(features: int) -> None:
    rng = np.random.default_rng(features)
    profile = InputProfile.fit(rng.normal(size=(3000, features)), seed=0)
    clock = [0.0]
    one, batched = _tracker(clock), _tracker(clock)
    requests = _stream(rng, features, 120)
    raised_one, raised_batched = set(), set()
    for i in range(0, len(requests), 6):  # the background scorer: several requests at once
        group = requests[i:i + 6]
        for rows in group:
            scores, u, _ = profile.assess(rows)
            _, raised = one.observe("c", "m", profile, rows, u, scores > 3)
            raised_one.update(name for name, _ in raised)
        rows = np.concatenate(group)
        scores, u, _ = profile.assess(rows)
        _, raised = batched.observe("c", "m", profile, rows, u, scores > 3)
        raised_batched.update(name for name, _ in raised)
    a, b = one._streams[("c", "m")], batched._streams[("c", "m")]
    # The projection into the usage space is one matrix product per call, and BLAS may round
    # a product of many rows differently from one of a few (another kernel, another order of
    # the sum) in the last bit: floats agree to rounding, every count and verdict exactly.
    assert a.dist_n == b.dist_n and a.last_w == b.last_w
    np.testing.assert_allclose(a.distances[:a.dist_n], b.distances[:b.dist_n], rtol=1e-12, atol=0)
    assert a.alarms == b.alarms
    assert raised_one == raised_batched
    assert raised_one  # the stepping requests are caught, either way

    def in_order(st: object) -> np.ndarray:
        memory, pos = st.memory, st.mem_pos  # type: ignore[attr-defined]
        return np.concatenate([memory[pos:], memory[:pos]])

    np.testing.assert_allclose(in_order(a), in_order(b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("features", [4, 40])
def test_prada_distances_are_those_to_the_nearest_prior_row(features: int) -> None:
    """The batched distances (windows read as one strided view, narrow rows summed column
    by column) are, bit for bit, each row's distance to the nearest of the ``memory`` rows
    before it, computed here row by row the plain way; exact repeats are left out."""
    rng = np.random.default_rng(features + 1)
    profile = InputProfile.fit(rng.normal(size=(3000, features)), seed=0)
    tracker = _tracker([0.0])
    memory, window = profile.usage_memory, profile.usage_window
    seen: list[np.ndarray] = []  # every row in the usage space, in arrival order
    expected: list[float] = []
    for rows in _stream(rng, features, 40):
        scores, u, _ = profile.assess(rows)
        tracker.observe("c", "m", profile, rows, u, scores > 3)
        for v in profile.usage_space(u):
            if len(seen) >= memory:
                prior = np.array(seen[-memory:])
                d = float(np.sqrt(((prior - v) * (prior - v)).sum(axis=1).min()))
                if d >= 1e-4:
                    expected.append(d)
            seen.append(v)
    st = tracker._streams[("c", "m")]
    assert len(expected) > window  # some windows filled and were tested
    assert 0 < st.dist_n == len(expected) % window  # the open window holds the latest
    assert st.distances[:st.dist_n].tolist() == expected[-st.dist_n:]


def test_rate_of_a_batch_equals_its_requests_one_by_one() -> None:
    clock = [0.0]
    one, batched = _tracker(clock), _tracker(clock)
    for t in range(0, 40):  # a steady caller, then a burst
        clock[0] = float(t)
        one.rate("c")
        batched.rate("c")
    clock[0] = 40.0
    raised_one = []
    for _ in range(200):
        ratio_one, raised = one.rate("c")
        raised_one.append(raised)
    ratio_batched, raised_batched = batched.rate("c", 200)
    assert ratio_batched == pytest.approx(ratio_one, rel=1e-12)
    assert ratio_batched > 3.0
    assert raised_batched and sum(raised_one) == 1  # raised once, as the burst crossed it


def test_background_queue_loses_and_repeats_nothing_under_concurrent_submits() -> None:
    """Submits take no lock: every queued request is scored exactly once, whether the
    scoring thread or a concurrent flush takes it, and an idle scorer is woken."""
    import threading

    from gateway.monitor._background import BackgroundScorer
    from gateway.monitor._metrics import Metrics

    seen: list[int] = []
    lock = threading.Lock()
    done = threading.Event()
    total = 8 * 500

    def score(key: str, profile: object, caller: str, rows: np.ndarray, *,
              requests: int = 1) -> None:
        with lock:
            seen.extend(int(v) for v in rows[:, 0])
            if len(seen) >= total:
                done.set()

    scorer = BackgroundScorer(score, lambda *a: None, Metrics(), max_backlog=10**6,
                              interval_s=0.001)

    def submitter(t: int) -> None:
        for i in range(500):
            scorer.submit("m/1", None, f"caller-{t}", np.array([[t * 500 + i]], float))
            if i % 100 == 0:
                scorer.flush()  # a flush racing the scoring thread's own

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert done.wait(30), f"only {len(seen)} of {total} requests were scored"
    assert sorted(seen) == list(range(total))
    # Idle again, a new request still wakes the scoring thread.
    done.clear()
    total += 1
    scorer.submit("m/1", None, "late", np.array([[float(total - 1)]]))
    assert done.wait(30)
    assert sorted(seen) == list(range(total))
