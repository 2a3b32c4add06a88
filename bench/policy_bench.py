"""Policy decision latency and hot-reload stall, side by side with casbin ``enforce``.

    python -m bench.policy_bench          (or `make bench`, which calls run())

For 100, 1k, 10k and 100k rules: p50/p99 of ``PolicyStore.decide`` and of casbin
``Enforcer.enforce`` on the same files (casbin scans every rule per call, so at large sizes
only a few of its calls are sampled), and the ratio casbin/ours. Then: reload a 100k-rule
policy while another thread keeps deciding, and report the reload time and the longest gap
between two consecutive decisions on that thread (the stall a request could see).
Targets (issue 3): p50 <= 10 us at 100k rules; reload of 100k under 2 s; no stall > 10 ms.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path

from gateway.policy import ACTIONS, PolicyStore
from tests.unit.test_policy_engine import RBAC_DENY_MODEL

# The RBAC-with-deny model the policy tests use, with glob object patterns.
MODEL = RBAC_DENY_MODEL.format(obj="globMatch")

SIZES = (100, 1_000, 10_000, 100_000)


def make_policy(rules: int, seed: int = 1) -> tuple[str, list[tuple[str, str, str]]]:
    """A policy of ``rules`` p lines (plus g lines) and a sample of requests against it."""
    rng = random.Random(seed)
    n_roles = max(5, rules // 20)
    n_users = max(10, rules // 10)
    n_models = max(10, rules // 50)
    roles = [f"role:team{i}" for i in range(n_roles)]
    users = [f"spiffe://bench.local/svc/u{i}" for i in range(n_users)]
    models = [f"team{i % n_roles}-model{i}" for i in range(n_models)]
    lines = []
    for i, role in enumerate(roles[1:], 1):  # a shallow hierarchy
        if rng.random() < 0.3:
            lines.append(f"g, {role}, {roles[rng.randrange(i)]}")
    members: dict[str, list[str]] = {}
    for user in users:
        for role in rng.sample(roles, 2):
            lines.append(f"g, {user}, {role}")
            members.setdefault(role, []).append(user)
    grants = []
    for _ in range(rules):
        subject = rng.choice(roles) if rng.random() < 0.9 else rng.choice(users)
        if rng.random() < 0.1:
            team = rng.randrange(n_roles)
            obj = f"team{team}-*"
            example = f"team{team}-model{team}"
        else:
            obj = example = rng.choice(models)
        effect = "deny" if rng.random() < 0.1 else "allow"
        action = rng.choice(ACTIONS)
        lines.append(f"p, {subject}, {obj}, {action}, {effect}")
        callers = members.get(subject, [subject]) if subject.startswith("role:") else [subject]
        if callers:
            grants.append((rng.choice(callers), example, action))
    rng.shuffle(lines)
    # Half the requests are ones some rule is about, half random (mostly default deny).
    requests = [rng.choice(grants) if rng.random() < 0.5 else
                (rng.choice(users), rng.choice(models), rng.choice(ACTIONS)) for _ in range(2000)]
    return "\n".join(lines) + "\n", requests


def write(directory: Path, policy: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.conf").write_text(MODEL)
    (directory / "policy.csv").write_text(policy)
    return directory


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50 / 1000, p99 / 1000


def time_calls(fn, requests, count: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for i in range(count):
        request = requests[i % len(requests)]
        t0 = clock()
        fn(*request)
        out.append(clock() - t0)
    return out


def bench_latency(root: Path) -> None:
    import casbin

    print("policy decision latency (us): ours vs casbin enforce on the same policy")
    print(f"{'rules':>8} {'ours p50':>9} {'ours p99':>9} {'casbin p50':>11} {'casbin p99':>11} "
          f"{'casbin/ours p50':>16} {'allowed':>8} {'agree':>6}")
    for size in SIZES:
        policy, requests = make_policy(size)
        directory = write(root / f"n{size}", policy)
        store = PolicyStore.load(directory)
        ours = time_calls(store.decide, requests, 50_000)
        enforcer = casbin.Enforcer(str(directory / "model.conf"), str(directory / "policy.csv"))
        n_casbin = {100: 2000, 1_000: 500, 10_000: 40, 100_000: 8}[size]
        theirs = time_calls(enforcer.enforce, requests, n_casbin)
        agree = all(store.decide(*r).allowed == enforcer.enforce(*r) for r in requests[:n_casbin])
        allowed = sum(store.decide(*r).allowed for r in requests) / len(requests)
        o50, o99 = percentiles(ours)
        c50, c99 = percentiles(theirs)
        print(f"{size:>8} {o50:>9.2f} {o99:>9.2f} {c50:>11.1f} {c99:>11.1f} "
              f"{c50 / o50:>15.0f}x {allowed:>8.0%} {agree!s:>6}")


def bench_reload(root: Path) -> None:
    policy_a, requests = make_policy(100_000, seed=1)
    policy_b, _ = make_policy(100_000, seed=2)
    directory = write(root / "reload", policy_a)
    store = PolicyStore.load(directory)
    stop = threading.Event()
    started = threading.Event()
    gaps: list[int] = []
    latencies: list[int] = []

    def decide_loop() -> None:
        clock = time.perf_counter_ns
        last = clock()
        i = 0
        while not stop.is_set():
            t0 = clock()
            store.decide(*requests[i % len(requests)])
            t1 = clock()
            latencies.append(t1 - t0)
            gaps.append(t1 - last)
            last = t1
            i += 1
            if i == 1000:
                started.set()

    thread = threading.Thread(target=decide_loop)
    thread.start()
    started.wait(30)
    # Baseline: the same thread while this one runs plain Python work (no reload) for about
    # as long as a reload takes: GIL and OS scheduling noise that any busy thread causes.
    mark = len(gaps)
    deadline = time.perf_counter() + 2.0
    busy = 0
    while time.perf_counter() < deadline:
        busy += sum(range(1000))
    quiet_gaps = gaps[mark:]
    mark = len(gaps)
    results = []
    for policy in (policy_b, policy_a, policy_b):
        (directory / "policy.csv").write_text(policy)
        t0 = time.perf_counter()
        result = store.reload("bench")
        results.append((result.duration_s, time.perf_counter() - t0, result.accepted))
    stop.set()
    thread.join()
    during_gaps = gaps[mark:]
    during_lat = latencies[mark:]
    p50, p99 = percentiles(during_lat)
    print("\nreload of a 100k-rule policy while one thread keeps deciding")
    for swapped, returned, accepted in results:
        print(f"  reload: new policy in force after {swapped:.2f} s (target < 2 s), "
              f"old one dismantled by {returned:.2f} s (accepted={accepted})")
    print(f"  decisions during reloads: {len(during_lat)}, p50 {p50:.2f} us, p99 {p99:.2f} us")
    worst, quiet = max(during_gaps) / 1e6, max(quiet_gaps) / 1e6
    over = sum(g > 10_000_000 for g in during_gaps)
    print(f"  max decision stall during reloads {worst:.2f} ms (target <= 10 ms); "
          f"{over} gaps over 10 ms")
    print(f"  baseline, same thread beside a busy Python thread (no reload): max gap "
          f"{quiet:.2f} ms; ratio reload/baseline {worst / quiet:.1f}x")


def run() -> None:
    """Print the figures (called by `make bench`)."""
    with tempfile.TemporaryDirectory(prefix="policy-bench-") as tmp:
        root = Path(tmp)
        bench_latency(root)
        bench_reload(root)


if __name__ == "__main__":
    run()
