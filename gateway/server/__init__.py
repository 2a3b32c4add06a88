"""The gateway server: wires identity, policy, models, inference and audit onto one mTLS port.

This package is the serving layer: the servicers (OIP in ``_oip``, admin, audit and explain)
sit on the guard (``_guard``), which alone combines identity, policy and audit around one
call; the domain packages below never import it (``.importlinter``, run by ``make test``).

    from gateway.config import load_config
    from gateway.server import Gateway
    gateway = Gateway.start(load_config(None))   # listening; returns once ready
    gateway.wait()                               # until SIGTERM/SIGINT (or gateway.stop())

With ``[server] processes`` above 1, ``gateway serve`` runs :class:`Supervisor` instead: a hub
process owning the audit log, the shared state and ``/metrics``, and that many workers, each
a ``Gateway`` started with ``worker=True`` and the hub's audit log (``_supervisor``, ``_hub``).

Every service on the port, health checking and server reflection included, runs its RPCs
through the guard (:mod:`gateway.server._guard`), held to the limits of
:mod:`gateway.server._limits`. Start-up fails closed: without a valid policy or a writable,
intact audit log the gateway does not start. While running, health turns NOT_SERVING
whenever the audit log cannot make records durable, and back to SERVING when it recovers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import secrets
import signal
import socket
import threading
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from gateway._proto.gateway.v1 import admin_pb2, audit_pb2, explain_pb2
from gateway.audit import AuditSink, open_log
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.explain import ExplainBudgets
from gateway.identity import IdentityVerifier, https_client_auth, server_credentials
from gateway.models import MODELS_TOPIC, ModelRepository
from gateway.monitor import MetricsServer, Monitor
from gateway.policy import (
    PolicyStore,
    ReloadResult,
    ShadowCollector,
    SourceCollector,
    open_source,
)
from gateway.server._admin import AdminServicer
from gateway.server._audit import AuditServicer
from gateway.server._explain import ExplainServicer
from gateway.server._guard import RECEIPT_INDEX, RECEIPT_LEAF, Guard
from gateway.server._limits import Limits, WorkerPool
from gateway.server._reads import BoundedReads
from gateway.server._services import GuardedHealth, GuardedReflection
from gateway.server._supervisor import Supervisor, supervise
from gateway.server._wiring import model_pipeline
from gateway.state import State, open_state

__all__ = ["RECEIPT_INDEX", "RECEIPT_LEAF", "Gateway", "Guard", "Supervisor", "supervise"]

log = logging.getLogger(__name__)

_OIP_SERVICE = "inference.GRPCInferenceService"
#: Health service name reporting whether the policy source (files or PostgreSQL) is readable.
POLICY_SOURCE_SERVICE = "gateway.policy.source"
#: Coordinator topic of policy reloads applied in every worker process.
POLICY_TOPIC = "policy"
#: Longest a ReloadPolicy waits for every worker (each compiles and tests the policy).
_POLICY_APPLY_TIMEOUT_S = 30.0
#: Seconds between health re-evaluations (state changes are also pushed immediately).
_HEALTH_INTERVAL = 0.5


class Gateway:
    """A running gateway; build it with :meth:`start`.

    A worker process (``worker=True``, started by the supervisor) takes its audit log from
    outside (the hub's, through ``RemoteAuditLog``), shares its port with the other workers
    (``SO_REUSEPORT``) and leaves ``/metrics`` to the hub.
    """

    def __init__(self, config: GatewayConfig, *, audit: AuditSink | None = None,
                 worker: bool = False) -> None:
        self.config = config
        self._given_audit = audit
        self.worker = worker
        self.instance_id = config.server.instance_id or f"{socket.gethostname()}:" \
            f"{config.server.listen.rsplit(':', 1)[-1]}"
        self._stopped = threading.Event()
        self._done = threading.Event()
        self._stop_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._health_status: tuple[int, int] | None = None
        self.port = 0

    @classmethod
    def start(cls, config: GatewayConfig, *, audit: AuditSink | None = None,
              worker: bool = False) -> Gateway:
        gateway = cls(config, audit=audit, worker=worker)
        gateway._start()
        return gateway

    def _start(self) -> None:
        # The OIP descriptors load here, not at import: a process that also loads another
        # copy of the `inference` proto package (tritonclient) can still use this package.
        from gateway._proto.inference import grpc_service_pb2
        from gateway.server._oip import InferenceServicer
        from gateway.server._oip import add_to_server as add_inference

        config = self.config
        # Audit first: nothing may be served, or even refused, unrecorded.
        self.audit: AuditSink = self._given_audit or open_log(
            config.audit, instance_id=self.instance_id)
        source = open_source(config.policy.source, config.policy.directory, config.policy.dsn,
                             name=f"gateway-policy {self.instance_id}")
        self.policy = PolicyStore.open(
            source, on_reload=self._audit_reload, shadow=config.policy.shadow,
            shadow_root=config.policy.shadow_root_path(),
            on_shadow_summary=lambda fields: self.audit.append("policy_shadow", fields),
            shadow_summary_interval=config.policy.shadow_summary_interval)
        self.verifier = IdentityVerifier(config.tls.trust_domains, config.tls.cn_issuers,
                                         trust_bundles=config.tls.trust_bundles)
        # Quotas and explain budgets: this process's own, or shared (hub, PostgreSQL).
        self.state = open_state(config.state, member=self.instance_id)
        self.monitor = _monitor(config, self.state)
        # Replicas (postgresql): the one holding the usage lease scores every replica's rows.
        self.state.score_usage(self.monitor.score_usage)
        self._subscribe_policy()
        self.audit.observe_commits(self.monitor.observe_audit_commit)
        self.monitor.metrics.registry.register(ShadowCollector(lambda: self.policy.shadow))
        self.monitor.metrics.registry.register(SourceCollector(self.policy))
        options, verify, scan, decrypt = model_pipeline(config)
        self.models = ModelRepository(
            config.models.repository, session_options=options, verify=verify, scan=scan,
            decrypt=decrypt, on_event=self._model_event,
            staging_root=config.models.staging_dir if config.models.stage_files else None)
        # The models' desired state first (what LoadModel/UnloadModel decided, on any
        # replica), then every other version on disk.
        self.coordinator = self.state.coordinator
        self.coordinator.subscribe(MODELS_TOPIC, self.models.apply_change)
        for entry in self.models.load_all(skip_known=True):
            log.info("model %s/%s: %s %s", entry.name, entry.version, entry.state, entry.reason)
        pool = WorkerPool(config.server.threads, hold=4 * config.server.workers)
        self.guard = Guard(verifier=self.verifier, policy=self.policy, models=self.models,
                           audit=self.audit, monitor=self.monitor,
                           limits=Limits(config.server, pool,
                                         peer_key=self.verifier.presented_pem))

        server = grpc.server(
            pool,
            interceptors=[BoundedReads(self.guard)],
            options=[
                ("grpc.max_receive_message_length", config.server.max_message_bytes),
                ("grpc.max_send_message_length", config.server.max_message_bytes),
                # Workers share the port; a single process must not (a second gateway
                # started by mistake on the same port fails instead of taking half the calls).
                ("grpc.so_reuseport", 1 if self.worker else 0),
            ],
            maximum_concurrent_rpcs=config.server.workers * 8,
        )
        add_inference(InferenceServicer(self.guard,
                                        max_tensor_elements=config.server.max_tensor_elements,
                                        ready=self.ready,
                                        max_response_bytes=config.server.max_message_bytes),
                      server)
        AdminServicer(self.guard, self.coordinator,
                      reload_policy=self.reload_policy).add_to_server(server)
        AuditServicer(self.audit, self.guard).add_to_server(server)
        self._add_explainer(server)
        self.health = GuardedHealth(self.guard)
        self.health.add_to_server(server)
        GuardedReflection(self.guard, (
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["PolicyAdmin"].full_name,
            audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
            explain_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )).add_to_server(server)
        credentials = server_credentials(config.tls.cert, config.tls.key, config.tls.ca,
                                         tuple(self.verifier.bundle_files))
        self.port = server.add_secure_port(config.server.listen, credentials)
        if not self.port:
            raise OSError(f"cannot listen on {config.server.listen}")
        self._server = server
        server.start()
        self._update_health()
        if config.policy.watch:
            self.policy.start_watching(config.policy.watch_interval)
        self.metrics_address = self._start_metrics()
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()
        if config.models.reverify_interval > 0:
            threading.Thread(target=self._reverify_loop, name="reverify", daemon=True).start()

    def _start_metrics(self) -> tuple[str, int] | None:
        """/metrics, over TLS with client certificates when ``[tls] metrics_tls`` says so."""
        monitor, tls = self.monitor, self.config.tls
        self._metrics_server = None
        self.metrics_url = ""
        if not monitor.settings.metrics_listen or self.worker:  # workers: the hub serves it
            return None
        listen = monitor.settings.metrics_listen
        if tls.metrics_tls == "on" or (tls.metrics_tls == "auto" and not _loopback(listen)):
            self._metrics_server = MetricsServer(
                monitor.metrics.registry, listen,
                tls=https_client_auth(tls.cert, tls.key, tls.ca))
            address = self._metrics_server.address
        else:
            started = monitor.start_http()
            if started is None:  # metrics_listen is set (checked above): it always starts
                return None
            address = started
        scheme = "https" if self._metrics_server is not None else "http"
        self.metrics_url = f"{scheme}://{address[0]}:{address[1]}/metrics"
        return address

    def _add_explainer(self, server: grpc.Server) -> None:
        settings = self.config.explain
        budgets = ExplainBudgets(settings.budget_evaluations, settings.budget_window_seconds,
                                 buckets=self.state.buckets)
        ExplainServicer(self.guard, budgets, settings).add_to_server(server)

    # -- state ------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Serving requires an audit log that can make records durable, and not stopping.

        (A policy is always in force once started: a reload that fails keeps the last good
        one, so policy is not part of readiness.)
        """
        return bool(self.audit.healthy) and not self._stopped.is_set()

    def _update_health(self) -> None:
        serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                health_pb2.HealthCheckResponse.NOT_SERVING)
        status = serving if self.ready() else not_serving
        # The policy source alone: while it is lost the installed policy stays in force (the
        # gateway serves), but a new version cannot arrive; monitors watch this service name.
        source = serving if status == serving and self.policy.source_status()[0] \
            else not_serving
        if (status, source) == self._health_status:
            return  # set() messages every watcher, changed or not
        self._health_status = (status, source)
        self.health.set("", status)
        self.health.set(_OIP_SERVICE, status)
        self.health.set(POLICY_SOURCE_SERVICE, source)

    def _health_loop(self) -> None:
        while not self._stopped.wait(_HEALTH_INTERVAL):
            try:
                self._update_health()
                self._record_alerts()
                self.guard.write_summaries()
                self.monitor.set_audit(self.audit.size, self.audit.checkpoint_age)
            except Exception:  # the loop must outlive any one failure, or health goes stale
                log.exception("health/alert pass failed")

    def _record_alerts(self) -> None:
        """Anomaly alerts become audit records (off the request path, in batches)."""
        for alert in self.monitor.alerts():
            try:
                self.audit.append("anomaly", alert.as_fields())
            except (GatewayError, ValueError) as err:
                log.error("anomaly alert not recorded: %s", err)

    def _model_event(self, kind: str, fields: dict) -> None:
        """Model loads, refusals and unloads: an audit record and the model-state metrics."""
        self.audit.append(kind, fields)
        model = fields["model"]
        self.monitor.set_model_state(model["name"], model["version"], kind == "model_load",
                                     kind != "model_refused")

    def _reverify_loop(self) -> None:
        while not self._stopped.wait(self.config.models.reverify_interval):
            try:
                self.models.reverify()
            except Exception:  # keep re-verifying; one failed pass must not end the loop
                log.exception("model re-verification pass failed")

    # -- policy reloads in every worker ------------------------------------------------------

    def _subscribe_policy(self) -> None:
        """Worker processes reload the policy together: a ReloadPolicy answered by one worker
        goes to every worker of the host through the coordinator (topic ``policy``)."""
        self._policy_results: dict[str, ReloadResult] = {}
        if self.state.backend == "host":
            self.state.coordinator.subscribe(POLICY_TOPIC, self._apply_policy_reload)

    def _apply_policy_reload(self, key: str, payload: Mapping[str, object]) -> str | None:
        result = self.policy.reload(str(payload.get("trigger") or "coordinated"))
        if result is None:
            return None
        nonce = payload.get("nonce")
        if isinstance(nonce, str):
            if len(self._policy_results) > 64:
                self._policy_results.clear()
            self._policy_results[nonce] = result
        return None if result.accepted else (result.error or "rejected")

    def reload_policy(self, trigger: str) -> ReloadResult:
        """Reload the policy in this process, or, as a worker, in every worker of the host
        before returning; the result is this worker's, its error naming any worker that did
        not apply it."""
        if self.state.backend != "host":
            result = self.policy.reload(trigger)
            assert result is not None  # only a watcher's if_changed reload returns None
            return result
        nonce = secrets.token_hex(8)
        answers = self.state.coordinator.apply_everywhere(
            POLICY_TOPIC, "reload", {"trigger": trigger, "nonce": nonce},
            timeout=_POLICY_APPLY_TIMEOUT_S)
        result = self._policy_results.pop(nonce, None)
        if result is None:  # this worker's own answer did not arrive: reload here
            result = self.policy.reload(trigger)
            assert result is not None
        missing = [f"{a.member}: {a.detail or 'no answer'}" for a in answers
                   if not a.ok and a.member != self.instance_id]
        if missing:
            error = "; ".join(filter(None, [result.error, "not applied by " + ", ".join(missing)]))
            result = dataclasses.replace(result, error=error)
        return result

    def _audit_reload(self, result: ReloadResult) -> None:
        self.audit.append("policy_reload", {
            "accepted": result.accepted, "old_digest": result.old_digest,
            "new_digest": result.new_digest, "error": result.error or None,
            "trigger": result.reason, "duration_ms": int(result.duration_s * 1000)})
        self.monitor.set_policy(self.policy.digest, result.accepted)

    # -- lifecycle --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop gracefully; SIGHUP reloads the policy (off the request path)."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(
            target=self.policy.reload, args=("SIGHUP",), daemon=True).start())

    def wait(self) -> None:
        """Block until the gateway has stopped and its audit log is closed."""
        self._done.wait()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, finish those in flight, then close the audit log."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        try:
            self.health.enter_graceful_shutdown()
            if self._server is not None:
                self._server.stop(grace).wait()
            self.policy.close()
            self.policy.clear_shadow()  # its final summary goes into the log before it closes
            self.monitor.flush()  # what was queued still gets scored ...
            self._record_alerts()  # ... and its alerts recorded, before the log closes
            self.state.close()
            self.monitor.stop_http()
            if self._metrics_server is not None:
                self._metrics_server.stop()
            self.guard.write_summaries(everything=True)
            self.audit.close()
            log.info("gateway stopped")
        finally:
            self._done.set()


def _loopback(listen: str) -> bool:
    """Whether ``listen`` (host:port) binds only the loopback interface."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _monitor(config: GatewayConfig, state: State) -> Monitor:
    return Monitor(config.monitor, buckets=state.buckets, usage_sink=state.usage)


def client_hint(config: GatewayConfig, port: int) -> str:
    """The ready-to-paste command that calls the demo model as the demo scorer."""
    certs = Path(config.tls.ca).parent
    return (f".venv/bin/gateway demo call --target 127.0.0.1:{port} "
            f"--certs {certs} --as scorer --model demo-mlp")
