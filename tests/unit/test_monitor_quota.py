"""Per-caller token buckets: RESOURCE_EXHAUSTED exactly past the bucket (injected clock)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gateway.config import load_config
from gateway.errors import ConfigError, QuotaExceeded
from gateway.monitor import Monitor, MonitorSettings

ALICE = "spiffe://demo.local/alice"
BOB = "spiffe://demo.local/bob"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**kw) -> MonitorSettings:
    return MonitorSettings(metrics_listen="", **kw)


def test_quota_rejects_exactly_past_the_bucket():
    clock = Clock()
    m = Monitor(settings(quotas={ALICE: {"rate": 2.0, "burst": 5}}), clock=clock)
    for _ in range(5):
        m.admit(ALICE)
    with pytest.raises(QuotaExceeded) as err:
        m.admit(ALICE)
    assert err.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ALICE in str(err.value) and "burst of 5" in str(err.value)
    clock.now += 0.49  # 0.98 tokens: still short of one
    with pytest.raises(QuotaExceeded):
        m.admit(ALICE)
    clock.now += 0.01 + 1e-9  # refilled to one token exactly
    m.admit(ALICE)
    with pytest.raises(QuotaExceeded):
        m.admit(ALICE)
    clock.now += 100  # refill is capped at the burst
    for _ in range(5):
        m.admit(ALICE)
    with pytest.raises(QuotaExceeded):
        m.admit(ALICE)
    # Other callers have their own buckets (here: no rule, so no quota).
    for _ in range(50):
        m.admit(BOB)
    alerts = m.alerts()
    # Four rejections, de-duplicated per alert interval (60 s): the second alert, 100 s
    # later, says it folded in the two rejections between.
    assert [(a.kind, a.caller, a.detail["suppressed"]) for a in alerts] == [
        ("quota", ALICE, 0), ("quota", ALICE, 2)]
    assert all(isinstance(v, int | str) for v in alerts[0].detail.values())


def test_rule_resolution_identity_then_role_then_default():
    clock = Clock()
    m = Monitor(settings(quota_rate=1.0, quota_burst=1,
                         quotas={"role:batch": {"rate": 0.0, "burst": 3},
                                 "role:bulk": {"rate": 0.0, "burst": 4},
                                 ALICE: {"rate": 0.0, "burst": 2}}), clock=clock)

    def admitted(caller: str, roles: tuple[str, ...]) -> int:
        n = 0
        while n < 100:
            try:
                m.admit(caller, roles)
            except QuotaExceeded:
                return n
            n += 1
        return n

    assert admitted(ALICE, ("batch", "bulk")) == 2  # identity wins over roles
    assert admitted(BOB, ("batch", "bulk")) == 4  # most generous role
    assert admitted("spiffe://demo.local/carol", ("batch",)) == 3
    assert admitted("spiffe://demo.local/dave", ()) == 1  # default quota


def test_no_quota_configured_admits_everything():
    m = Monitor(settings())
    for _ in range(1000):
        m.admit(ALICE)


@pytest.mark.parametrize("quotas", [
    {ALICE: {"rate": 1.0}},
    {ALICE: {"rate": -1.0, "burst": 2}},
    {ALICE: {"rate": 1.0, "burst": 0}},
    {ALICE: {"rate": 1.0, "burst": 2, "extra": 1}},
    {ALICE: 5},
])
def test_bad_quota_rules_are_config_errors(quotas):
    with pytest.raises(ConfigError, match=r"monitor.quotas"):
        settings(quotas=quotas)


def test_quotas_from_toml_and_validation(tmp_path: Path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        '[monitor]\nmetrics_listen = "127.0.0.1:0"\nquota_rate = 2\nquota_burst = 4\n'
        'input_fpr = 0.01\n'
        f'[monitor.quotas]\n"{ALICE}" = {{ rate = 5.0, burst = 10 }}\n'
        '"role:batch" = { rate = 50, burst = 100 }\n')
    s = load_config(cfg).monitor
    assert s.quota_rate == 2.0 and s.input_fpr == 0.01
    rules, default = s.quota_rules()
    assert rules[ALICE].burst == 10 and rules["role:batch"].rate == 50.0
    assert default is not None and default.burst == 4
    cfg.write_text("[monitor]\ninput_fpr = 0.7\n")
    with pytest.raises(ConfigError, match="input_fpr"):
        load_config(cfg)
    cfg.write_text('[monitor]\nmetrics_listen = "nonsense"\n')
    with pytest.raises(ConfigError, match="metrics_listen"):
        load_config(cfg)
    cfg.write_text("[monitor]\nquota_rate = 1.0\n")
    with pytest.raises(ConfigError, match="quota_burst"):
        load_config(cfg)


def test_rate_ratio_against_callers_own_baseline():
    clock = Clock()
    m = Monitor(settings(alert_interval_s=0), clock=clock)
    for _ in range(600):  # one request a second for ten minutes: the baseline
        m.score("t/1", None, ALICE, [[0.0]])
        clock.now += 1.0
    steady = m.score("t/1", None, ALICE, [[0.0]])["anomaly.rate_ratio"]
    assert 0.5 < steady < 2.0
    for _ in range(800):  # then forty a second for twenty seconds
        clock.now += 0.025
        burst = m.score("t/1", None, ALICE, [[0.0]])["anomaly.rate_ratio"]
    assert burst > 10
    assert [a.kind for a in m.alerts()] == ["rate"]
    # A new caller at a constant high rate is its own baseline: no alarm.
    for _ in range(400):
        clock.now += 0.05
        ratio = m.score("t/1", None, BOB, [[0.0]])["anomaly.rate_ratio"]
    assert ratio < 2.0
    assert not m.alerts()
