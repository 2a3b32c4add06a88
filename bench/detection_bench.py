"""Per-request detection of out-of-distribution inputs against the optimal test (`make bench`).

For 4, 16 and 64 features: a profile is fitted by ``InputProfile.fit`` on ``REF_ROWS`` rows of
the reference distribution (half to fit, half held out to calibrate), then for each case
``TEST_ROWS`` fresh rows are scored. Printed side by side, at the same false-positive rate:
the share the gateway's alarm catches (``score > threshold``, hard bounds included) and the
share the optimal test catches, the Mahalanobis distance under the *true* distribution with
its chi-square threshold. The first line of each table is the false-positive rate achieved
on fresh in-distribution rows.

The correlation break (every feature equal) is out of reach of any per-request test at low
dimension: such a row is an ordinary draw of N(0, I) seen alone, and even the optimal test
catches few. A caller sending them is caught over a window instead: the share of callers the
monitor's per-caller probe detector (too many input alarms in its window) flags is printed.
The scoring cost per call beside the gateway's own total is printed last.

``tests/unit/test_monitor_power.py`` asserts these figures; both use the helpers below.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.monitor import InputProfile, Monitor, MonitorSettings

FPR = 0.01
DIMENSIONS = (4, 16, 64)
REF_ROWS = 20000
TEST_ROWS = 20000
#: Equicorrelation of the correlated reference (the last case of each table).
RHO = 0.7


def _one(d: int) -> np.ndarray:
    e = np.zeros(d)
    e[0] = 1.0
    return e


#: name -> rows(d, n, rng), all against the N(0, I) reference.
CASES: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "normal N(0, 1) (false positives)": lambda d, n, r: r.standard_normal((n, d)),
    "every feature shifted by +3": lambda d, n, r: r.standard_normal((n, d)) + 3,
    "scale x3": lambda d, n, r: 3 * r.standard_normal((n, d)),
    "uniform on [-4, 4]": lambda d, n, r: r.uniform(-4, 4, (n, d)),
    "one feature shifted by +4": lambda d, n, r: r.standard_normal((n, d)) + 4 * _one(d),
    "all features equal (correlation break)":
        lambda d, n, r: np.repeat(r.standard_normal((n, 1)), d, axis=1),
    "every feature shifted by +1": lambda d, n, r: r.standard_normal((n, d)) + 1,
    "one feature scaled x4": lambda d, n, r: r.standard_normal((n, d)) * (1 + 3 * _one(d)),
    "one feature at 8 sd": lambda d, n, r: r.standard_normal((n, d)) + 8 * _one(d),
}
#: The out-of-reach case, shown with its per-caller window figure.
OUT_OF_REACH = "all features equal (correlation break)"
#: Against a correlated reference: independent features (the correlation lost).
CORRELATED_CASE = f"independent features, reference equicorrelated {RHO}"


def equicorrelated(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of N(0, S) with S = (1 - RHO) I + RHO 11'."""
    common = rng.standard_normal((n, 1))
    return math.sqrt(RHO) * common + math.sqrt(1 - RHO) * rng.standard_normal((n, d))


def chi2_isf(p: float, d: int) -> float:
    """The chi-square(d) quantile with upper tail ``p`` (bisection on the exact survival)."""
    def sf(x: float) -> float:
        y = x / 2
        # Q(a, y) by the recurrence Q(a + 1, y) = Q(a, y) + y^a e^-y / Gamma(a + 1).
        a, q = (1.0, math.exp(-y)) if d % 2 == 0 else (0.5, math.erfc(math.sqrt(y)))
        while a < d / 2:
            q += math.exp(a * math.log(y) - y - math.lgamma(a + 1)) if y > 0 else 0.0
            a += 1
        return q

    lo, hi = 0.0, 10.0 * d + 200
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sf(mid) > p else (lo, mid)
    return (lo + hi) / 2


def optimal_rate(x: np.ndarray, fpr: float, precision: np.ndarray | None = None) -> float:
    """Share of rows the Mahalanobis test on the true distribution flags at ``fpr``."""
    sq = (x * x).sum(axis=1) if precision is None else ((x @ precision) * x).sum(axis=1)
    return float((sq > chi2_isf(fpr, x.shape[1])).mean())


def case_rates(profile: InputProfile, fpr: float = FPR, seed: int = 1
               ) -> list[tuple[str, float, float]]:
    """[(case, gateway rate, optimal rate)] of ``profile`` (N(0, I) reference) on fresh rows."""
    threshold = profile.threshold(fpr)
    rows = []
    for i, (name, make) in enumerate(CASES.items()):
        x = make(profile.features, TEST_ROWS, np.random.default_rng(1000 * seed + i))
        rows.append((name, float((profile.score(x) > threshold).mean()), optimal_rate(x, fpr)))
    return rows


def detection_table(d: int, fpr: float = FPR, seed: int = 1
                    ) -> tuple[InputProfile, list[tuple[str, float, float]]]:
    """(profile, [(case, gateway rate, optimal rate)]) on fresh rows, at ``fpr``."""
    profile = InputProfile.fit(np.random.default_rng(seed).standard_normal((REF_ROWS, d)),
                               fprs=(fpr,), seed=0)
    rows = case_rates(profile, fpr, seed)
    corr = InputProfile.fit(equicorrelated(d, REF_ROWS, np.random.default_rng(seed)),
                            fprs=(fpr,), seed=0)
    x = np.random.default_rng(1000 * seed + 99).standard_normal((TEST_ROWS, d))
    precision = np.linalg.inv((1 - RHO) * np.eye(d) + RHO)
    rows.append((CORRELATED_CASE, float((corr.score(x) > corr.threshold(fpr)).mean()),
                 optimal_rate(x, fpr, precision)))
    return profile, rows


def window_detection(profile: InputProfile, d: int, callers: int = 40, calls: int = 256,
                     seed: int = 5) -> tuple[float, float]:
    """Shares of (correlation-break callers, normal callers) flagged by the per-caller window
    detectors within ``calls`` single-row calls each, at the default settings."""
    monitor = Monitor(MonitorSettings(metrics_listen="", input_fpr=FPR))
    flagged = {}
    for kind, make in (("break", CASES[OUT_OF_REACH]), ("normal", CASES[next(iter(CASES))])):
        hits = 0
        for c in range(callers):
            x = make(d, calls, np.random.default_rng(seed * 1000 + c))
            caller = f"{kind}-{c}"
            hits += any(monitor.score("m/1", profile, caller, x[i:i + 1])
                        ["anomaly.extraction_alarm"] for i in range(calls))
        flagged[kind] = hits / callers
    return flagged["break"], flagged["normal"]


def _best_us(fn: Callable[[], object], calls: int, repeat: int = 5) -> float:
    """CPU µs per call, the best of ``repeat`` runs (this machine is shared and noisy)."""
    best = math.inf
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return 1e6 * best / calls


def scoring_cost(calls: int = 2000) -> dict[str, float]:
    """µs per request of the anomaly scoring on demo-mlp's profile, one row per request.

    CPU time (process_time), so waiting for this shared machine's cores is not counted.
    ``input score``: the profile's assess() alone (bounds, normal scores, both components,
    surprise). ``synchronous``: Monitor.score, all detectors, metrics and alerts included, as
    the guard runs it when a policy rule needs the scores before answering. ``background``:
    score_later then one flush, 16 callers interleaved, as the monitor thread runs it when
    no rule needs them.
    """
    from gateway.models.demo import demo_reference

    profile = InputProfile.fit(demo_reference(), fprs=(0.01, 0.001), seed=0)
    rows = demo_reference(rows=calls, seed=7).astype(np.float64)
    monitor = Monitor(MonitorSettings(metrics_listen=""))

    def assess() -> None:
        for i in range(calls):
            profile.assess(rows[i:i + 1])

    def synchronous() -> None:
        for i in range(calls):
            monitor.score("demo-mlp/1", profile, f"caller-{i % 16}", rows[i:i + 1])

    # The monitor thread would flush on its own after score_interval_s: not within the run.
    later = Monitor(MonitorSettings(metrics_listen="", score_interval_s=3600))

    def background() -> None:
        for i in range(calls):
            later.score_later("demo-mlp/1", profile, f"caller-{i % 16}", rows[i:i + 1])
        later.flush()

    return {"input score": _best_us(assess, calls), "synchronous": _best_us(synchronous, calls),
            "background": _best_us(background, calls)}


#: The deny rule of the README's demo: it makes the gateway score before answering.
ANOMALY_RULE = ("p, role:scorers, *, infer, deny, "
                "model.labels.sensitivity == 'high' && anomaly.input_alarm\n")


def gateway_cpu() -> dict[str, tuple[float, float]]:
    """{mode: (CPU µs per call with scoring on, with scoring off)} of the whole gateway
    process (bench/scoring_cpu.py), on fresh demo deployments: ``background`` (no rule
    needs the scores) and ``synchronous`` (the README's rule on ``anomaly.input_alarm``)."""
    from gateway.devenv import make_demo_env

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("background", "synchronous"):
            env = make_demo_env(Path(tmp) / mode)
            if mode == "synchronous":
                with open(env.policies / "policy.csv", "a") as f:
                    f.write(ANOMALY_RULE)
            proc = subprocess.run([sys.executable, "-m", "bench.scoring_cpu", str(env.config)],
                                  capture_output=True, text=True, timeout=600, check=True,
                                  cwd=Path(__file__).resolve().parent.parent)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            out[mode] = (float(result["on"]), float(result["off"]))
    return out


def _table(rows: list[tuple[str, float, float]]) -> None:
    print(f"  {'inputs':<52} {'gateway':>8} {'optimal':>8} {'diff':>6}")
    for name, ours, best in rows:
        print(f"  {name:<52} {ours:8.3f} {best:8.3f} {ours - best:+6.3f}")


def run() -> None:
    from gateway.models.demo import demo_reference

    demo = InputProfile.fit(demo_reference(), fprs=(0.01, 0.001), seed=0)  # as demo init
    print(f"detection, demo-mlp's profile (4 features, {len(demo_reference())} reference rows "
          f"as `gateway demo init` fits it): FPR target {FPR}, held-out FPR at fitting "
          f"{demo.heldout_fpr(FPR)}")
    _table(case_rates(demo))
    for d in DIMENSIONS:
        started = time.perf_counter()
        profile, rows = detection_table(d)
        print(f"detection, {d} features: profile fitted on {REF_ROWS} rows in "
              f"{time.perf_counter() - started:.1f} s (with the tables); FPR target {FPR}, "
              f"held-out FPR at fitting {profile.heldout_fpr(FPR)}")
        _table(rows)
        caught, benign = window_detection(profile, d)
        print(f"  per-caller window ({OUT_OF_REACH}): {caught:.2f} of callers flagged within "
              f"256 calls; normal callers {benign:.2f}")
    cost = scoring_cost()
    print("scoring per request (one row, demo-mlp's profile), CPU µs:")
    for name, us in cost.items():
        print(f"  {name:<12} {us:6.1f} µs")
    cpu = gateway_cpu()
    print("gateway CPU per call, whole process, ModelInfer called directly, scoring on and "
          "off in alternating blocks (bench/scoring_cpu.py; budget: scoring <= 5%):")
    for mode, (on, off) in cpu.items():
        print(f"  {mode:<12} {on:6.0f} µs on, {off:6.0f} µs off: scoring {on - off:+5.0f} µs "
              f"= {100 * (on - off) / on:+5.1f}% of the call")

if __name__ == "__main__":
    run()
