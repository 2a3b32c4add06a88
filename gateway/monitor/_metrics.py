"""The gateway's Prometheus metrics, in a registry of its own, and their HTTP listener.

Each :class:`Metrics` owns a ``CollectorRegistry`` (no process-global state), so tests can run
several gateways in one process. Per-caller series are bounded: the usage tracker's LRU
removes an evicted caller's series. Names follow the Prometheus conventions: ``gateway_``
prefix, base units (seconds), ``_total`` counters, ``_info`` for labels-as-values.

With worker processes (``[server] processes``) every worker writes its values to
prometheus-client's multiprocess directory and the hub serves their sum: counters and
histograms add up; each gauge says how it combines (``multiprocess_mode``: ``livemax`` for
"any worker", ``livemin`` for "every worker", e.g. a model is loaded only when loaded in all).
The library's limits apply there: custom collectors registered in a worker (the policy shadow
and policy source collectors) are not exported, and a removed series keeps its last value, so
removed gauges are zeroed first (a removed counter series stays until the gateway restarts).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import TypeVar, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.metrics import MetricWrapperBase

from gateway.errors import ConfigError

Metric = TypeVar("Metric", bound=MetricWrapperBase)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
_FSYNC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0, 16.0)
STAGES = ("decision", "inference", "audit", "total")
#: Seconds a /metrics client over TLS has to complete its handshake.
_HANDSHAKE_TIMEOUT_S = 10.0


class Metrics:
    """Every metric the gateway exports; methods are thread-safe (prometheus-client locks)."""

    def __init__(self, max_callers: int = 1024) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests", "Requests by model, version, action, decision and gRPC status.",
            ("model", "version", "action", "decision", "status"), registry=r)
        self.stage_seconds = Histogram(
            "gateway_request_stage_duration_seconds",
            "Time spent per request in each stage: decision (identity and policy), "
            "inference, audit (durable record) and total.",
            ("stage",), buckets=_LATENCY_BUCKETS, registry=r)
        self.policy_info = Gauge("gateway_policy_info", "Digest of the policy in force (value 1).",
                                 ("digest",), registry=r, multiprocess_mode="livemax")
        self.policy_reloads = Counter("gateway_policy_reloads", "Policy reloads by outcome.",
                                      ("outcome",), registry=r)
        self.policy_ok = Gauge("gateway_policy_last_reload_success",
                               "1 if the last policy (re)load succeeded, else 0.", registry=r,
                               multiprocess_mode="livemin")
        self.audit_entries = Gauge("gateway_audit_log_entries",
                                   "Entries in the audit log (Merkle tree size).", registry=r,
                                   multiprocess_mode="livemax")
        self.audit_fsync = Histogram("gateway_audit_fsync_duration_seconds",
                                     "Latency of audit log fsyncs.", buckets=_FSYNC_BUCKETS,
                                     registry=r)
        self.audit_checkpoint_age = Gauge("gateway_audit_checkpoint_age_seconds",
                                          "Age of the latest signed audit checkpoint.", registry=r,
                                          multiprocess_mode="livemin")
        self.model_loaded = Gauge("gateway_model_loaded", "1 if the model version is loaded.",
                                  ("model", "version"), registry=r, multiprocess_mode="livemin")
        self.model_signature = Gauge("gateway_model_signature_valid",
                                     "1 if the model version's signature verified.",
                                     ("model", "version"), registry=r, multiprocess_mode="livemin")
        self.input_ratio = Histogram(
            "gateway_anomaly_input_score_ratio",
            "Input anomaly score of each request divided by its calibrated threshold "
            "(above 1: alarm).", ("model",), buckets=_RATIO_BUCKETS, registry=r)
        self.detections = Counter("gateway_anomaly_detections",
                                  "Anomalies detected, by kind (before alert de-duplication).",
                                  ("kind", "model"), registry=r)
        self.alerts = Counter("gateway_anomaly_alerts",
                              "Anomaly alerts emitted to the audit log, by kind.",
                              ("kind", "model"), registry=r)
        self.alerts_dropped = Counter("gateway_anomaly_alerts_dropped",
                                      "Alerts dropped because the queue was full.", registry=r)
        self.unscored = Counter("gateway_unscored_requests",
                                "Requests not scored because the background scoring queue "
                                "was full.", registry=r)
        self.drift_psi = Gauge("gateway_output_drift_psi",
                               "PSI of the last closed output window against the reference.",
                               ("model",), registry=r, multiprocess_mode="livemax")
        self.drift_threshold = Gauge("gateway_output_drift_psi_threshold",
                                     "Calibrated PSI alarm threshold.", ("model",), registry=r,
                                     multiprocess_mode="livemax")
        self.latency_ratio = Gauge("gateway_latency_baseline_ratio",
                                   "Median total latency of the last window over its baseline.",
                                   ("model", "version"), registry=r, multiprocess_mode="livemax")
        self.caller_requests = Counter("gateway_caller_requests",
                                       "Requests per caller by quota outcome (LRU-bounded).",
                                       ("caller", "outcome"), registry=r)
        self.caller_rate_ratio = Gauge("gateway_caller_rate_ratio",
                                       "Caller's recent request rate over its own baseline.",
                                       ("caller",), registry=r, multiprocess_mode="livemax")
        self.caller_extraction = Gauge("gateway_caller_extraction_alarm",
                                       "1 while an extraction detector is raised for the caller.",
                                       ("caller",), registry=r, multiprocess_mode="livemax")
        self.caller_input_alarms = Counter("gateway_caller_input_alarms",
                                           "Requests of the caller that raised the input alarm.",
                                           ("caller",), registry=r)
        self.refusals_limited = Counter(
            "gateway_refusals_limited",
            "Refused calls over their caller's refusal rate: answered RESOURCE_EXHAUSTED and "
            "counted into audit summaries instead of one record each, by refusal reason.",
            ("reason",), registry=r)
        self._policy_digest: str | None = None
        self._lock = threading.Lock()
        self._max_callers = max_callers
        self._callers: OrderedDict[str, None] = OrderedDict()
        # labels() costs a lock and a tuple hash; resolved children are cached here.
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}

    def child(self, metric: Metric, *labels: str) -> Metric:
        """``metric.labels(*labels)``, cached."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        # Keyed by the metric's id: what is cached is this metric's own labelled child.
        return cast(Metric, found)

    def refusal_limited(self, reason: str) -> None:
        """Count a refusal over the rate limit (``reason``: the guard's fixed reason codes)."""
        self.child(self.refusals_limited, reason).inc()

    def caller(self, caller: str) -> None:
        """Note activity of ``caller``; the least recent beyond ``max_callers`` loses its
        series, so per-caller cardinality stays bounded whatever identities call."""
        with self._lock:
            if caller in self._callers:
                self._callers.move_to_end(caller)
                return
            self._callers[caller] = None
            if len(self._callers) <= self._max_callers:
                return
            evicted, _ = self._callers.popitem(last=False)
        self.forget_caller(evicted)

    def set_policy(self, digest: str, reload_ok: bool) -> None:
        with self._lock:
            if reload_ok and digest != self._policy_digest:
                if self._policy_digest is not None:
                    # Zeroed first: with worker processes a removed series keeps its value.
                    self.policy_info.labels(self._policy_digest).set(0)
                    self.policy_info.remove(self._policy_digest)
                self.policy_info.labels(digest).set(1)
                self._policy_digest = digest
        self.policy_reloads.labels("success" if reload_ok else "failure").inc()
        self.policy_ok.set(1 if reload_ok else 0)

    def forget_caller(self, caller: str) -> None:
        """Drop a caller's series."""
        for metric, extra in ((self.caller_rate_ratio, ()), (self.caller_extraction, ()),
                              (self.caller_input_alarms, ()),
                              (self.caller_requests, ("admitted",)),
                              (self.caller_requests, ("rejected",))):
            self._children.pop((id(metric), (caller, *extra)), None)
            if isinstance(metric, Gauge):  # zeroed first (see the module docstring)
                metric.labels(caller, *extra).set(0)
            try:
                metric.remove(caller, *extra)
            except KeyError:
                pass


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes are not worth a line on stderr each


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"[monitor] metrics_listen {listen!r}: expected host:port")
    return host.strip("[]"), int(port)


class _TlsServer(_Server):
    """The listener with TLS; the handshake runs in the request's thread, bounded in time,
    so a client stalling it holds only its own thread, never the accept loop."""

    tls: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        sock.settimeout(_HANDSHAKE_TIMEOUT_S)
        return self.tls.wrap_socket(sock, server_side=True,
                                    do_handshake_on_connect=False), address

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: tuple[str, int]) -> None:
        assert isinstance(request, ssl.SSLSocket)  # get_request wraps every connection
        try:
            request.do_handshake()
        except (OSError, ssl.SSLError):
            return  # no certificate, a wrong one, or too slow: no answer at all
        super().finish_request(request, client_address)


class MetricsServer:
    """``GET /metrics`` in the Prometheus text format on a daemon thread; 404 elsewhere.

    With ``tls`` (an SSLContext that requires client certificates) it is served over HTTPS
    to clients presenting an accepted certificate only.
    """

    def __init__(self, registry: CollectorRegistry, listen: str,
                 tls: ssl.SSLContext | None = None) -> None:
        host, port = parse_listen(listen)
        metrics_app = make_wsgi_app(registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are served at /metrics\n"]
            return metrics_app(environ, start_response)

        try:
            self._httpd = make_server(host, port, app, _Server if tls is None else _TlsServer,
                                      handler_class=_QuietHandler)
        except OSError as err:
            raise ConfigError(f"[monitor] metrics_listen {listen}: cannot listen: {err}") from err
        if isinstance(self._httpd, _TlsServer) and tls is not None:
            self._httpd.tls = tls
        self.scheme = "http" if tls is None else "https"
        # A short poll interval makes stop() prompt (shutdown waits for the next poll).
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="gateway-metrics", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
