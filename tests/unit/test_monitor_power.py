"""Per-request detection against the optimal test, on seeded data (issue 21's targets).

Profiles are fitted on seeded N(0, I) reference rows of 4, 16 and 64 features (and an
equicorrelated one), every rate is measured on fresh rows of other seeds, 20,000 per case,
so a rate's sampling error is under half a point and the outcome is fixed by the seeds.
Asserted: the false-positive rate within one point of its 1% target, and every case's
detection within 10 points of the optimal test at the same rate (Mahalanobis distance under
the true distribution, chi-square threshold). `pytest -s` prints the table
(`python -m bench detection` prints the same one).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.detection_bench import (
    CASES,
    FPR,
    OUT_OF_REACH,
    case_rates,
    chi2_isf,
    detection_table,
    window_detection,
)
from gateway.models.demo import demo_reference
from gateway.monitor import InputProfile, Monitor, MonitorSettings

pytestmark = pytest.mark.slow


def test_chi2_quantiles_match_reference_values():
    # Published 99% points of chi-square (e.g. R's qchisq(0.99, d)), four decimals.
    for d, want in ((1, 6.6349), (4, 13.2767), (5, 15.0863), (16, 32.0000), (64, 93.2169)):
        assert abs(chi2_isf(0.01, d) - want) < 5e-4, d


@pytest.mark.parametrize("d", [4, 16, 64])
def test_detection_is_within_ten_points_of_the_optimal_test(d):
    profile, rows = detection_table(d)
    print(f"\n{d} features, FPR target {FPR}:")
    for name, ours, best in rows:
        print(f"  {name:<52} gateway {ours:.3f}  optimal {best:.3f}")
    rates = {name: (ours, best) for name, ours, best in rows}
    fpr, _ = rates[next(iter(CASES))]
    assert abs(fpr - FPR) <= 0.01
    assert abs(profile.heldout_fpr(FPR) - FPR) <= 0.01  # what `gateway model profile` prints
    for name, (ours, best) in rates.items():
        assert ours >= best - 0.10, (name, ours, best)
    # The hard cases stay hard for the optimal test too: that is what "out of reach" means.
    assert rates[OUT_OF_REACH][1] < 0.25


def test_the_demo_profile_is_within_ten_points_of_the_optimal_test():
    """The issue's table, on demo-mlp's profile as `gateway demo init` fits it (4,000 rows)."""
    demo = InputProfile.fit(demo_reference(), fprs=(0.01, 0.001), seed=0)
    rates = case_rates(demo)
    assert abs(rates[0][1] - FPR) <= 0.01
    for name, ours, best in rates:
        assert ours >= best - 0.10, (name, ours, best)


def test_correlation_break_is_caught_over_a_callers_window():
    """Per request even the optimal test catches 7% of these rows at 4 features; a caller
    sending them trips the per-caller probe detector, and normal callers do not."""
    profile, _ = detection_table(4)
    caught, benign = window_detection(profile, 4)
    print(f"\ncorrelation-break callers flagged within 256 calls: {caught:.2f}; "
          f"normal callers {benign:.2f}")
    assert caught >= 0.9 and benign <= 0.05


def test_scores_keep_growing_beyond_the_reference_range():
    profile = InputProfile.fit(np.random.default_rng(1).standard_normal((4000, 4)), seed=0)
    z = np.array([2.5, 3.0, 3.5, 4.0, 4.5])
    scores = profile.score(np.stack([z, -z, 0 * z, 0 * z], axis=1)[:, [2, 0, 3, 1]])
    assert (np.diff(scores) > 0).all()  # no plateau at the edge of the quantile grid
    # The Gaussian tail fitted beyond the outer knots: the normal scores of far values are
    # close to the values themselves for N(0, 1) data.
    far = profile.marginals(np.array([[5.0, -5.0, 8.0, -8.0]]))[0]
    assert np.allclose(np.abs(far), [5, 5, 8, 8], rtol=0.15)
    # The hard bounds are wider than anything the reference held, and alarm on their own.
    assert (profile.high > 4.5).all() and (profile.low < -4.5).all()
    assert (profile.high < 8).all() and (profile.low > -8).all()
    m = Monitor(MonitorSettings(metrics_listen=""))
    attrs = m.score("t/1", profile, "alice", np.array([[0.0, 0.0, 9.0, 0.0]]))
    assert attrs["anomaly.bounds_violation"] and attrs["anomaly.input_alarm"]
    (alert,) = m.alerts()
    assert alert.detail["component"] == "bounds" and alert.detail["feature"] == 2


def test_alarms_name_the_component_and_feature_that_drove_them():
    profile = InputProfile.fit(np.random.default_rng(1).standard_normal((4000, 8)), seed=0)
    assert profile.explain(np.array([0, 0, 0, 0, 0, 4.5, 0, 0])) == ("single", 5)
    component, _ = profile.explain(np.full(8, 2.0))
    assert component == "joint"
    assert profile.explain(np.array([0, np.nan, 0, 0, 0, 0, 0, 0])) == ("bounds", 1)


@pytest.mark.parametrize("d", [4, 12])  # the one-row whitening in Python, and in numpy
def test_one_row_and_batch_scores_agree_and_an_empty_batch_is_scored(d):
    profile = InputProfile.fit(np.random.default_rng(1).standard_normal((4000, d)), seed=0)
    x = np.random.default_rng(2).normal(0, 1.5, (2000, d))
    x[::50, 1] = np.nan
    batch, u_batch, _ = profile.assess(x)
    single = [profile.assess(x[i:i + 1]) for i in range(len(x))]
    one = np.array([s[0][0] for s in single])
    finite = np.isfinite(batch)
    assert (finite == np.isfinite(one)).all() and 1000 < finite.sum() < len(x)
    assert np.allclose(batch[finite], one[finite], rtol=1e-12, atol=1e-12)
    u_one = np.concatenate([s[1] for s in single])
    assert np.allclose(u_batch[finite], u_one[finite], rtol=1e-12, atol=1e-12)
    m = Monitor(MonitorSettings(metrics_listen=""))
    attrs = m.score("t/1", profile, "alice", np.zeros((0, d), dtype=np.float32))
    assert attrs["anomaly.input_alarm"] is False and attrs["anomaly.input_score"] == 0.0
    assert profile.score(np.zeros((0, d))).shape == (0,)


def test_background_scoring_batches_each_callers_requests_when_callers_interleave():
    profile = InputProfile.fit(np.random.default_rng(1).standard_normal((4000, 4)), seed=0)
    m = Monitor(MonitorSettings(metrics_listen="", score_interval_s=3600))
    far = np.array([[0.0, 0.0, 0.0, 4.5]])
    for _ in range(3):
        m.score_later("t/1", profile, "alice", far)
        m.score_later("t/1", profile, "bob", np.zeros((1, 4)))
    m.flush()
    (alert,) = m.alerts()  # one batch for alice, none alarming for bob
    assert alert.caller == "alice" and alert.kind == "input"
    assert alert.detail["batch"] == 3 and alert.detail["rows"] == 3
    assert alert.detail["component"] == "single" and alert.detail["feature"] == 3


def test_calibration_holds_on_discrete_skewed_and_heavy_tailed_features():
    def data(n: int, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        g = r.standard_normal((n, 3))
        return np.column_stack([
            r.integers(0, 2, n), r.poisson(3, n), np.exp(g[:, 0]), r.uniform(0, 1, n),
            g[:, 1], 0.8 * g[:, 1] + 0.6 * g[:, 2], r.standard_t(3, n), np.round(10 * g[:, 2])])

    profile = InputProfile.fit(data(6000, 1), fprs=(0.01, 0.001), seed=0)
    scores = profile.score(data(50000, 2))
    for fpr in (0.05, 0.01, 0.005, 0.001):
        measured = float((scores > profile.threshold(fpr)).mean())
        assert abs(measured - fpr) <= max(0.2 * fpr, 0.0005), (fpr, measured)
    # Hard bounds on heavy tails (Student t with 3 degrees of freedom, log-normal) still
    # hold nearly every reference-like row.
    assert float(np.isinf(scores).mean()) < 0.0005


def test_a_constant_feature_stays_in_bounds_and_any_change_to_it_alarms(tmp_path):
    ref = np.random.default_rng(0).standard_normal((2000, 3))
    ref[:, 1] = 0.123456789012345  # more digits than the profile stores
    profile = InputProfile.fit(ref, seed=0)
    profile.save(tmp_path / "profile.json")
    loaded = InputProfile.load(tmp_path / "profile.json")
    assert not loaded.out_of_bounds(ref).any()
    changed = ref[:1].copy()
    changed[0, 1] += 1e-6
    assert np.isinf(loaded.score(changed)[0])
