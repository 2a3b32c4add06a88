"""The ``[monitor]`` settings table, validated at load (a bad value is a ConfigError)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ConfigError
from gateway.monitor._metrics import parse_listen
from gateway.monitor._quota import QuotaRule


@dataclass(frozen=True)
class MonitorSettings:
    """The ``[monitor]`` table: metrics listener, quotas, and anomaly detection."""

    #: host:port of the Prometheus listener (path /metrics); empty disables it. Port 0: any.
    metrics_listen: str = "127.0.0.1:9464"
    #: Compute anomaly scores (false: attributes are neutral, for overhead comparisons).
    scoring: bool = True
    #: Per-row false-positive rate of the input alarm: the share of in-distribution requests
    #: a rule on ``anomaly.input_alarm`` refuses. Thresholds come from the model's
    #: profile.json (calibrated on held-out data at 0.05, 0.01, 0.005, 0.001 and the FPRs
    #: given when profiling; another value uses the nearest stricter one).
    input_fpr: float = 0.01
    #: False-positive rate per test of each extraction detector (PRADA window, probe and
    #: sweep counts).
    extraction_fpr: float = 0.001
    #: False-positive rate per output window of the drift alarm.
    drift_fpr: float = 0.001
    #: Default quota for every caller: requests per second (0: no default quota) ...
    quota_rate: float = 0.0
    #: ... and bucket size (requests allowed at once); at least 1 when quota_rate > 0.
    quota_burst: int = 0
    #: Quotas per identity or role: ``"spiffe://d/x" = {rate = 5.0, burst = 10}`` or
    #: ``"role:batch" = {...}``. An identity entry wins over its roles (the most generous
    #: role wins among several) and over the default. Each caller has its own bucket.
    quotas: dict[str, Any] = field(default_factory=dict, hash=False)
    #: Time constants (s) of the short and long request-rate averages per caller.
    rate_short_s: float = 10.0
    rate_long_s: float = 600.0
    #: Baseline floor (requests/s), so a nearly idle caller is not an alarm at 1 request.
    rate_floor: float = 0.2
    #: Rate ratio (short over long) at which a caller's rate is an anomaly.
    rate_ratio_alarm: float = 10.0
    #: Rows of each request examined by the usage detectors (a random sample beyond).
    usage_rows: int = 64
    #: Recent rows per caller and model for the uniform-probe count and the sweep count.
    probe_window: int = 64
    sweep_window: int = 32
    #: Requests per latency window, and the median-over-baseline ratio that is an alarm.
    latency_window: int = 256
    latency_ratio_alarm: float = 3.0
    #: LRU cap on tracked callers (and caller x model streams, and per-caller metric series).
    #: A stream holds about 128 x min(features, 32) x 8 bytes (32 KiB at most).
    max_callers: int = 1024
    #: Requests queued for background scoring (when no policy rule needs their scores
    #: before answering); beyond this they go unscored and gateway_unscored_requests_total
    #: counts them.
    max_backlog: int = 4096
    #: Seconds between background scoring passes; each pass scores everything queued since
    #: the last one, batched per caller and model.
    score_interval_s: float = 0.05
    #: Pending alerts kept for the server to drain (oldest dropped and counted beyond).
    max_alerts: int = 1000
    #: Minimum seconds between two alerts of one kind (and detector) for one caller and
    #: model (the ``suppressed`` count of the next alert says how many were folded in).
    alert_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.metrics_listen:
            parse_listen(self.metrics_listen)
        for name in ("input_fpr", "extraction_fpr", "drift_fpr"):
            value = getattr(self, name)
            if not 0 < value < 0.5:
                raise ConfigError(f"[monitor] {name} must be in (0, 0.5), got {value}")
        for name in ("usage_rows", "probe_window", "sweep_window", "latency_window",
                     "max_callers", "max_alerts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[monitor] {name} must be at least 1")
        for name in ("rate_short_s", "rate_long_s", "rate_floor", "rate_ratio_alarm",
                     "latency_ratio_alarm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[monitor] {name} must be positive")
        if self.rate_short_s >= self.rate_long_s:
            raise ConfigError("[monitor] rate_short_s must be shorter than rate_long_s")
        if self.alert_interval_s < 0:
            raise ConfigError("[monitor] alert_interval_s must not be negative")
        self.quota_rules()  # validate now: a bad quota is a configuration error at load

    def quota_rules(self) -> tuple[dict[str, QuotaRule], QuotaRule | None]:
        """The per-identity/role rules and the default rule, validated."""
        if self.quota_rate < 0 or (self.quota_rate > 0 and self.quota_burst < 1):
            raise ConfigError("[monitor] quota_rate must be >= 0, with quota_burst >= 1 if set")
        default = (QuotaRule(self.quota_rate, self.quota_burst, "default")
                   if self.quota_rate > 0 else None)
        rules = {}
        for key, value in self.quotas.items():
            where = f"[monitor.quotas] {key!r}"
            if not isinstance(value, dict) or set(value) - {"rate", "burst"}:
                raise ConfigError(f"{where}: expected {{rate = <per second>, burst = <int>}}")
            rate, burst = value.get("rate"), value.get("burst")
            if (not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 0
                    or not isinstance(burst, int) or isinstance(burst, bool) or burst < 1):
                raise ConfigError(f"{where}: rate must be a number >= 0 and burst an int >= 1")
            rules[key] = QuotaRule(float(rate), burst, key)
        return rules, default
