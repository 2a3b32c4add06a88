"""Monitoring and anomaly detection: metrics, per-caller quotas, and anomaly scores as attributes.

    monitor = Monitor(config.monitor)
    monitor.start_http()                                   # GET http://127.0.0.1:9464/metrics
    monitor.admit(caller, roles)                           # QuotaExceeded past the token bucket
    attrs = monitor.score("iris/1", profile, caller, x)    # {"anomaly.input_score": ..., ...}
    ...                                                     # policy decides with attrs
    monitor.observe_output("iris/1", y)
    for alert in monitor.alerts(): audit.append("anomaly", alert.as_fields())

The scores are ABAC attributes of the request, so policy can act on them (for example, deny
``infer`` on a sensitive model when ``anomaly.input_alarm`` or ``anomaly.extraction_alarm`` is
set), and every alarm becomes an :class:`Alert` the server writes to the audit log. Every
threshold is calibrated on held-out reference data at a configured false-positive rate (see
:class:`InputProfile`), not taken from folklore. All state is bounded (LRU per caller, fixed
windows) and every method is thread-safe and cheap enough for the request path.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import ConfigError, QuotaExceeded

from ._drift import LatencyWatch, OutputDrift
from ._metrics import STAGES, Metrics, MetricsServer, parse_listen
from ._profile import InputProfile, OutputProfile, ProfileError
from ._quota import QuotaRule, Quotas
from ._usage import UsageTracker

__all__ = ["PROFILE_FILE", "Alert", "InputProfile", "Monitor", "MonitorSettings",
           "OutputProfile", "ProfileError", "load_profile"]

PROFILE_FILE = "profile.json"


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


@dataclass(frozen=True)
class Alert:
    """One anomaly for the audit log (kind ``anomaly``); only str and int values, no floats.

    ``kind`` is what was detected: ``input``, ``bounds``, ``rate``, ``extraction``,
    ``output_drift``, ``latency`` or ``quota``. ``score``/``threshold`` are decimal strings.
    """

    kind: str
    caller: str
    model: str
    score: str
    threshold: str
    detail: dict[str, int | str] = field(default_factory=dict)

    def as_fields(self) -> dict[str, Any]:
        """The fields of its audit record (record kind ``anomaly``; ``alert`` says which)."""
        return {"alert": self.kind, "caller": self.caller, "model": self.model,
                "score": self.score, "threshold": self.threshold, "detail": dict(self.detail)}


def _dec(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


log = logging.getLogger(__name__)

_NEUTRAL: dict[str, object] = {
    "anomaly.input_score": 0.0, "anomaly.input_threshold": math.inf,
    "anomaly.input_alarm": False, "anomaly.bounds_violation": False,
    "anomaly.rate_ratio": 1.0, "anomaly.extraction_alarm": False,
}


#: The per-row alarm array of a one-row request (read-only, shared).
_ROW_ALARM = {flag: np.array([flag]) for flag in (False, True)}
for _flags in _ROW_ALARM.values():
    _flags.flags.writeable = False


class Monitor:
    """The gateway's monitor; one per server. ``clock`` (monotonic seconds) is injectable."""

    def __init__(self, settings: MonitorSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = s = settings or MonitorSettings()
        self.metrics = Metrics(s.max_callers)
        self._clock = clock
        rules, default = s.quota_rules()
        self._quotas = Quotas(rules, default, s.max_callers, clock)
        self._usage = UsageTracker(
            input_fpr=s.input_fpr, extraction_fpr=s.extraction_fpr,
            probe_window=s.probe_window, sweep_window=s.sweep_window,
            rows_per_request=s.usage_rows, rate_short_s=s.rate_short_s,
            rate_long_s=s.rate_long_s, rate_floor=s.rate_floor,
            rate_ratio_alarm=s.rate_ratio_alarm, max_callers=s.max_callers, clock=clock)
        self._drift = OutputDrift(s.drift_fpr, s.max_callers)
        self._latency = LatencyWatch(s.latency_window, s.latency_ratio_alarm, s.max_callers)
        self._profiles: dict[str, OutputProfile] = {}
        self._thresholds: dict[int, tuple[InputProfile, float]] = {}
        self._alerts: deque[Alert] = deque()
        self._last_alert: dict[tuple[str, str, str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._server: MetricsServer | None = None
        # Stage histograms resolved once: labels() on the hot path costs a lock and a dict.
        self._stage = {st: self.metrics.stage_seconds.labels(st) for st in STAGES}
        # Scoring off the request path (see score_later): a bounded queue, one worker.
        self._backlog: deque[tuple[str, InputProfile | None, str, np.ndarray,
                                   np.ndarray | None]] = deque()
        self._backlog_ready = threading.Condition(threading.Lock())
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ listener

    def start_http(self) -> tuple[str, int] | None:
        """Start the /metrics listener; returns its (host, port), None if disabled."""
        if not self.settings.metrics_listen:
            return None
        if self._server is None:
            self._server = MetricsServer(self.metrics.registry, self.settings.metrics_listen)
        return self._server.address

    def stop_http(self) -> None:
        """Stop the listener (idempotent)."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self._server.address if self._server else None

    # ------------------------------------------------------------------ background scoring

    def score_later(self, model_key: str, profile: InputProfile | None, caller_id: str,
                    x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Score on the monitor's own thread: for requests whose decision needs no score.

        Detection, metrics and alerts still see every request, but the response does not
        wait, and the numpy work runs on one thread instead of on every RPC worker at once
        (numpy releases and re-takes the GIL inside small operations; sixteen workers doing
        so contend for it and made scoring cost three times its single-thread CPU). The
        queue is bounded (``max_backlog``); beyond it requests go unscored and are counted.
        ``y``, the request's predictions, feeds the output-drift windows in the same pass.
        """
        with self._backlog_ready:
            if len(self._backlog) >= self.settings.max_backlog:
                self.metrics.unscored.inc()
                return
            self._backlog.append((model_key, profile, caller_id, x, y))
            if self._worker is None:
                self._worker = threading.Thread(target=self._score_backlog,
                                                 name="monitor-scoring", daemon=True)
                self._worker.start()
            self._backlog_ready.notify()

    def _score_backlog(self) -> None:
        interval = self.settings.score_interval_s
        while True:
            with self._backlog_ready:
                while not self._backlog:
                    self._backlog_ready.wait()
            # Let requests accumulate: one pass over many rows costs about what one row does,
            # and the RPC threads are interrupted once per interval, not once per request.
            time.sleep(interval)
            self.flush()

    def flush(self) -> None:
        """Score everything queued by :meth:`score_later` now (also at shutdown)."""
        with self._backlog_ready:
            items = list(self._backlog)
            self._backlog.clear()
        # The requests of one caller to one model are scored as one batch: the detectors
        # (all per caller) see the same rows in the same order, with a fraction of the numpy
        # calls (each of which may hand the GIL to the RPC threads and back), also when
        # concurrent callers' requests interleave in the queue.
        runs: dict[tuple[str, int, str, tuple[int, ...]], list] = {}
        for item in items:
            runs.setdefault((item[0], id(item[1]), item[2], item[3].shape[1:]), []).append(item)
        for run in runs.values():
            key, profile, caller, x, _y = run[0]
            try:
                rows = x if len(run) == 1 else np.concatenate([i[3] for i in run])
                self.score(key, profile, caller, rows, requests=len(run))
                outputs = [i[4] for i in run if i[4] is not None]
                if outputs and all(o.shape[1:] == outputs[0].shape[1:] for o in outputs):
                    self.observe_output(key, np.concatenate(outputs), profile)
            except Exception:  # a bad row must not stop monitoring
                log.exception("background anomaly scoring failed")

    # ------------------------------------------------------------------ quotas

    def admit(self, caller_id: str, roles: Iterable[str] = ()) -> None:
        """Charge one request to ``caller_id``'s bucket; :class:`QuotaExceeded` if it is empty."""
        mx = self.metrics
        mx.caller(caller_id)
        try:
            self._quotas.admit(caller_id, roles)
        except QuotaExceeded as err:
            mx.child(mx.caller_requests, caller_id, "rejected").inc()
            self._alert("quota", caller_id, "", 0.0, 0.0, {"message": str(err)})
            raise
        mx.child(mx.caller_requests, caller_id, "admitted").inc()

    # ------------------------------------------------------------------ scores

    def score(self, model_key: str, profile: InputProfile | None, caller_id: str,
              x: np.ndarray, *, requests: int = 1) -> dict[str, object]:
        """The request's anomaly attributes (see module doc); records metrics and alerts.

        ``requests`` > 1 scores the rows of that many consecutive requests of one caller at
        once (background scoring); the attributes then describe them together.
        """
        if not self.settings.scoring:
            return dict(_NEUTRAL)
        attrs = dict(_NEUTRAL)
        mx = self.metrics
        mx.caller(caller_id)
        for _ in range(requests - 1):
            self._usage.rate(caller_id)
        ratio, rate_raised = self._usage.rate(caller_id)
        attrs["anomaly.rate_ratio"] = ratio
        mx.child(mx.caller_rate_ratio, caller_id).set(ratio)
        if rate_raised:
            self._alert("rate", caller_id, model_key, ratio, self.settings.rate_ratio_alarm, {})
        x = np.asarray(x)
        numeric = x.dtype.kind in "biuf"
        if profile is None:
            if numeric and x.dtype.kind == "f" and not np.isfinite(x).all():
                attrs["anomaly.bounds_violation"] = True
                self._alert("bounds", caller_id, model_key, math.inf, 0.0,
                            {"reason": "NaN or infinite value"})
            return attrs
        if profile.output is not None:
            self._profiles[model_key] = profile.output
        cached = self._thresholds.get(id(profile))
        if cached is None or cached[0] is not profile:
            cached = (profile, profile.threshold(self.settings.input_fpr))
            if len(self._thresholds) > 256:
                self._thresholds.clear()
            self._thresholds[id(profile)] = cached
        threshold = cached[1]
        attrs["anomaly.input_threshold"] = threshold
        # Explicit widths: reshape(n, -1) cannot infer -1 for an empty batch.
        rows = (x.reshape(x.shape[0], math.prod(x.shape[1:])) if x.ndim >= 2
                else x.reshape(1, x.size))
        if not numeric or rows.shape[1] != profile.features:
            attrs.update({"anomaly.input_score": math.inf, "anomaly.input_alarm": True,
                          "anomaly.bounds_violation": True})
            reason = ("non-numeric input" if not numeric else
                      f"{rows.shape[1]} features per row, profile has {profile.features}")
            self._alert("bounds", caller_id, model_key, math.inf, threshold, {"reason": reason})
            return attrs
        rows = rows.astype(np.float64, copy=False)
        scores, u, in_bounds = profile.assess(rows)
        if len(scores) == 1:  # most requests: Python floats, no cold numpy calls
            top = float(scores[0])
            alarm, oob = top > threshold, not in_bounds[0]
            row_alarms = _ROW_ALARM[alarm]
        else:
            row_alarms = scores > threshold
            top = float(scores.max()) if len(scores) else 0.0
            alarm = bool(row_alarms.any())
            oob = not in_bounds.all()
        attrs["anomaly.input_score"] = top
        attrs["anomaly.input_alarm"] = alarm
        attrs["anomaly.bounds_violation"] = oob
        mx.child(mx.input_ratio, model_key).observe(top / threshold)
        if alarm:
            # What drove the worst row: a hard bound, the joint distance or one feature.
            component, feature = profile.explain(rows[int(np.argmax(scores))])
            detail: dict[str, int | str] = {"batch": len(rows), "component": component,
                                            "feature": feature}
            if oob:
                self._alert("bounds", caller_id, model_key, top, threshold,
                            {"rows": int((~in_bounds).sum()), **detail})
            else:
                mx.child(mx.caller_input_alarms, caller_id).inc()
                self._alert("input", caller_id, model_key, top, threshold,
                            {"rows": int(row_alarms.sum()), **detail})
        if oob:
            rows, u, row_alarms = rows[in_bounds], u[in_bounds], row_alarms[in_bounds]
        if len(rows):
            extraction, raised = self._usage.observe(caller_id, model_key, profile, rows, u,
                                                     row_alarms)
            attrs["anomaly.extraction_alarm"] = extraction
            mx.child(mx.caller_extraction, caller_id).set(1 if extraction else 0)
            for _name, detail in raised:
                self._alert("extraction", caller_id, model_key, 1.0, 0.0, detail)
        return attrs

    def observe_output(self, model_key: str, y: np.ndarray,
                       profile: InputProfile | None = None) -> None:
        """Feed predictions to the drift windows (profile: else the one last used to score)."""
        if not self.settings.scoring:
            return
        out = profile.output if profile is not None else self._profiles.get(model_key)
        if out is None:
            return
        for psi, threshold in self._drift.observe(model_key, out, np.asarray(y)):
            self.metrics.drift_psi.labels(model_key).set(psi)
            self.metrics.drift_threshold.labels(model_key).set(threshold)
            if psi > threshold:
                self._alert("output_drift", "", model_key, psi, threshold,
                            {"window": out.window})

    # ------------------------------------------------------------------ request metrics

    def observe_request(self, model: str, version: str, action: str, decision: str,
                        status: str, latency_s: dict[str, float]) -> None:
        """Count one finished request and its stage latencies (keys of ``STAGES``)."""
        mx = self.metrics
        mx.child(mx.requests, model, version, action, decision, status).inc()
        for stage, seconds in latency_s.items():
            hist = self._stage.get(stage)
            if hist is not None:
                hist.observe(seconds)
        total = latency_s.get("total")
        if model and total is not None and status == "OK":
            ratio = self._latency.observe((model, version), total)
            if ratio is not None:
                self.metrics.latency_ratio.labels(model, version).set(ratio)
                if ratio >= self.settings.latency_ratio_alarm:
                    self._alert("latency", "", f"{model}/{version}", ratio,
                                self.settings.latency_ratio_alarm,
                                {"window": self.settings.latency_window})

    def set_policy(self, digest: str, reload_ok: bool) -> None:
        """Record a policy (re)load: the digest in force (only if it loaded) and the outcome."""
        self.metrics.set_policy(digest, reload_ok)

    def set_audit(self, size: int, checkpoint_age_s: float) -> None:
        """Record the audit log's size (entries) and the age of its latest checkpoint."""
        self.metrics.audit_entries.set(size)
        self.metrics.audit_checkpoint_age.set(checkpoint_age_s)

    def observe_audit_commit(self, seconds: float, records: int = 1) -> None:
        """Record one durable audit commit (write + flush) and how long it took."""
        self.metrics.audit_fsync.observe(seconds)

    def set_model_state(self, name: str, version: str, loaded: bool, signature_ok: bool) -> None:
        """Record whether a model version is loaded and whether its signature verified."""
        self.metrics.model_loaded.labels(name, version).set(1 if loaded else 0)
        self.metrics.model_signature.labels(name, version).set(1 if signature_ok else 0)

    # ------------------------------------------------------------------ alerts

    def alerts(self) -> list[Alert]:
        """Drain the pending alerts (the server writes each as an audit record)."""
        with self._lock:
            out = list(self._alerts)
            self._alerts.clear()
        return out

    def _alert(self, kind: str, caller: str, model: str, score: float, threshold: float,
               detail: dict[str, int | str]) -> None:
        self.metrics.detections.labels(kind, model).inc()
        now = self._clock()
        key = (kind, caller, model, str(detail.get("detector", "")))
        with self._lock:
            last, suppressed = self._last_alert.get(key, (-math.inf, 0))
            if now - last < self.settings.alert_interval_s:
                self._last_alert[key] = (last, suppressed + 1)
                return
            self._last_alert[key] = (now, 0)
            if len(self._last_alert) > 4 * self.settings.max_callers:
                self._last_alert = {k: v for k, v in self._last_alert.items()
                                    if now - v[0] < self.settings.alert_interval_s}
                if len(self._last_alert) > 4 * self.settings.max_callers:
                    self._last_alert.clear()  # bounded memory beats perfect de-duplication
            if len(self._alerts) >= self.settings.max_alerts:
                self._alerts.popleft()
                self.metrics.alerts_dropped.inc()
            self._alerts.append(Alert(kind, caller, model, _dec(score), _dec(threshold),
                                      {**detail, "suppressed": suppressed}))
        self.metrics.alerts.labels(kind, model).inc()


def load_profile(version_dir: str | Path) -> InputProfile | None:
    """The model version's ``profile.json`` if present (None: the model is not profiled).

    Load it only after the version's signature verified, as for the model itself: the
    profile sets the thresholds policy decides on. Raises :class:`ProfileError` if malformed.
    """
    path = Path(version_dir) / PROFILE_FILE
    return InputProfile.load(path) if path.exists() else None

