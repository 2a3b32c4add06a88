"""The monitor facade: one object the server calls for quotas, scores, metrics and alerts."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable

import numpy as np

from gateway.errors import QuotaExceeded
from gateway.monitor._alerts import Alert, AlertQueue
from gateway.monitor._background import BackgroundScorer
from gateway.monitor._drift import LatencyWatch, OutputDrift
from gateway.monitor._metrics import STAGES, Metrics, MetricsServer
from gateway.monitor._profile import InputProfile, OutputProfile
from gateway.monitor._quota import Quotas
from gateway.monitor._settings import MonitorSettings
from gateway.monitor._usage import UsageTracker
from gateway.state import Buckets, Usage, UsageSink

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
                 clock: Callable[[], float] = time.monotonic, *,
                 buckets: Buckets | None = None, usage_sink: UsageSink | None = None) -> None:
        """``buckets``: a shared state's (quotas across processes or replicas; default this
        process's own). ``usage_sink``: hand background scoring to the host's hub instead of
        this process's thread (see :meth:`score_later`)."""
        self.settings = s = settings or MonitorSettings()
        self.metrics = Metrics(s.max_callers)
        self._clock = clock
        rules, default = s.quota_rules()
        self._quotas = Quotas(rules, default, s.max_callers, clock, buckets)
        self._sink = usage_sink
        if usage_sink is not None:  # rows the hub never got are unscored requests too
            usage_sink.on_dropped(self.metrics.unscored.inc)
        # Profiles as the hub receives them: serialised once per profile object (worker
        # side), parsed once per digest (hub side).
        self._profile_bytes: dict[int, tuple[InputProfile, bytes, str]] = {}
        self._parsed: dict[str, InputProfile] = {}
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
        self._alerts = AlertQueue(self.metrics, interval_s=s.alert_interval_s,
                                  max_alerts=s.max_alerts, max_callers=s.max_callers,
                                  clock=clock)
        self._alert = self._alerts.add
        self._server: MetricsServer | None = None
        # Stage histograms resolved once: labels() on the hot path costs a lock and a dict.
        self._stage = {st: self.metrics.stage_seconds.labels(st) for st in STAGES}
        # Scoring off the request path (see score_later): a bounded queue, one worker.
        self._background = BackgroundScorer(self.score, self.observe_output, self.metrics,
                                            max_backlog=s.max_backlog,
                                            interval_s=s.score_interval_s)

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
        wait (see :mod:`gateway.monitor._background`). The queue is bounded
        (``max_backlog``); beyond it requests go unscored and are counted. ``y``, the
        request's predictions, feeds the output-drift windows in the same pass.

        With a usage sink (worker processes of a host) the rows go to the hub in batches and
        the hub's monitor scores them (:meth:`score_usage`), with every worker's traffic.
        """
        if self._sink is None:
            self._background.submit(model_key, profile, caller_id, x, y)
            return
        blob, digest = b"", ""
        if profile is not None:
            cached = self._profile_bytes.get(id(profile))
            if cached is None or cached[0] is not profile:
                if len(self._profile_bytes) > 256:
                    self._profile_bytes.clear()
                raw = profile.to_json()
                cached = (profile, raw, hashlib.sha256(raw).hexdigest())
                self._profile_bytes[id(profile)] = cached
            blob, digest = cached[1], cached[2]
        self._sink.submit(Usage(model_key, caller_id, x, y, blob, digest))

    def score_usage(self, member: str, batch: list[Usage]) -> None:
        """The hub's side of :meth:`score_later`: queue a worker's batch for scoring here.

        Registered as the :class:`~gateway.state.StateServer`'s ``on_usage``; ``member`` is
        the worker that sent it (the rows carry their caller).
        """
        for u in batch:
            profile = None
            if u.profile_digest:
                profile = self._parsed.get(u.profile_digest)
                if profile is None:
                    if len(self._parsed) > 256:
                        self._parsed.clear()
                    profile = self._parsed[u.profile_digest] = InputProfile.from_json(
                        u.profile)
            self._background.submit(u.model, profile, u.caller, u.x, u.y)

    def flush(self) -> None:
        """Score (or hand to the hub) everything queued by :meth:`score_later` now (also at
        shutdown)."""
        if self._sink is not None:
            self._sink.flush()
        self._background.flush()

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
        ratio, rate_raised = self._usage.rate(caller_id, requests)
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
        return self._alerts.drain()
