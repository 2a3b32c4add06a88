"""The hub: the one process of a host that owns what its worker processes share.

It opens the file audit log and serves it to the workers on a Unix socket
(``gateway.audit.LogServer``: one index space, one chain, one tree, one checkpoint signer), serves
the host's shared state (``gateway.state.StateServer``: quotas, explain budgets, model and policy
changes applied in every worker) on another, and the one ``/metrics`` endpoint, which adds up
what every worker wrote to the prometheus-client multiprocess directory. It also scores every
worker's usage (one monitor sees a caller's traffic on all of them) and records its alerts as
its own audit records (``instance`` ``<host>:<port>/hub``). It never serves gRPC:
a dead hub costs no caller a connection, only an answer (the workers fail closed until the
supervisor has it back).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import GatewayConfig
from gateway.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    from gateway.audit import AuditSink
    from gateway.monitor import MetricsServer, Monitor

log = logging.getLogger("gateway.hub")

#: How often the hub records its monitor's alerts and refreshes the audit gauges.
_ALERT_INTERVAL_S = 0.5


@dataclass(frozen=True)
class RuntimePaths:
    """Where the processes of one gateway meet: ``[server] runtime_dir`` (mode 0700)."""

    root: Path

    @property
    def audit_socket(self) -> Path:
        return self.root / "audit.sock"

    @property
    def state_socket(self) -> Path:
        return self.root / "state.sock"

    @property
    def processes(self) -> Path:
        """Which pid is which process (written by the supervisor)."""
        return self.root / "processes.json"

    @property
    def desired_state(self) -> Path:
        """The coordinator's desired state, kept across hub restarts (not gateway restarts:
        a new gateway starts from the repository on disk, as one process does)."""
        return self.root / "desired-state.json"

    @property
    def metrics(self) -> Path:
        """prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``)."""
        return self.root / "metrics"


def run_hub(config: GatewayConfig, paths: RuntimePaths, instance_id: str,
            report: Callable[[dict[str, object]], None]) -> int:
    """Serve until SIGTERM or SIGINT (blocked by the caller: taken here with ``sigtimedwait``).

    ``report`` is called once: ``{"ok": True, "metrics": url}`` when serving, or
    ``{"ok": False, "error": text}`` when the log (or anything else) cannot be opened.
    """
    from gateway.audit import LogServer, open_log
    from gateway.monitor import Monitor
    from gateway.state import StateServer

    # With [audit] backend = "postgresql" every worker writes to the database itself; the
    # hub only appends its own records there.
    file_log = config.audit.backend != "postgresql"
    log_server = LogServer(config.audit, paths.audit_socket, instance_id=instance_id) \
        if file_log else None
    # One monitor scores every worker's usage: extraction detection sees a caller's traffic
    # across all of them, and scoring leaves the workers' GIL.
    monitor = Monitor(config.monitor)
    state_server = StateServer(paths.state_socket, state_file=paths.desired_state,
                               on_usage=monitor.score_usage)
    metrics: MetricsServer | None = None
    try:
        if log_server is not None:
            log_server.start()
            own: AuditSink = log_server.log
        else:
            own = open_log(config.audit, instance_id=instance_id)
        state_server.start()
        metrics, url = _serve_metrics(config, paths)
    except (GatewayError, OSError) as err:
        text = err.diagnostics() if isinstance(err, GatewayError) else str(err)
        report({"ok": False, "error": text, "config": isinstance(err, ConfigError)})
        for stop in (metrics.stop if metrics else None, state_server.stop):
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()
        return 2
    report({"ok": True, "metrics": url})
    received = None
    while received is None:
        received = signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, _ALERT_INTERVAL_S)
        _record_alerts(monitor, own)
        if file_log:
            monitor.set_audit(own.size, own.checkpoint_age)
    log.info("%s: closing the audit log", signal.Signals(received.si_signo).name)
    if metrics is not None:
        metrics.stop()
    state_server.stop()
    monitor.flush()  # what the workers handed over still gets scored ...
    _record_alerts(monitor, own)  # ... and its alerts recorded
    if log_server is not None:
        log_server.stop()  # pending commits finish; a final signed checkpoint
    else:
        own.close()
    log.info("hub stopped")
    return 0


def _record_alerts(monitor: Monitor, audit: AuditSink) -> None:
    """Alerts of the hub's scoring become the hub's own audit records."""
    for alert in monitor.alerts():
        try:
            audit.append("anomaly", alert.as_fields())
        except (GatewayError, ValueError) as err:
            log.error("anomaly alert not recorded: %s", err)


def _serve_metrics(config: GatewayConfig,
                   paths: RuntimePaths) -> tuple[MetricsServer | None, str]:
    """``/metrics`` for every worker: prometheus-client's multiprocess collector over the
    directory the workers write (TLS as ``[tls] metrics_tls`` says, as one process does)."""
    listen = config.monitor.metrics_listen
    if not listen:
        return None, ""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from gateway.identity import https_client_auth
    from gateway.monitor import MetricsServer
    from gateway.server import _loopback

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(paths.metrics))
    tls = config.tls
    secure = tls.metrics_tls == "on" or (tls.metrics_tls == "auto" and not _loopback(listen))
    server = MetricsServer(registry, listen,
                           tls=https_client_auth(tls.cert, tls.key, tls.ca) if secure else None)
    host, port = server.address
    return server, f"{server.scheme}://{host}:{port}/metrics"
