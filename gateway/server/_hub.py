"""The hub: the one process of a host that owns what its worker processes share.

It opens the file audit log and serves it to the workers on a Unix socket
(``gateway.audit.LogServer``: one index space, one chain, one tree, one checkpoint signer), serves
the host's shared state (``gateway.state.StateServer``: quotas, explain budgets, model and policy
changes applied in every worker) on another, and the one ``/metrics`` endpoint, which adds up
what every worker wrote to the prometheus-client multiprocess directory. It never serves gRPC:
a dead hub costs no caller a connection, only an answer (the workers fail closed until the
supervisor has it back).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import GatewayConfig
from gateway.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    from gateway.monitor import MetricsServer

log = logging.getLogger("gateway.hub")


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
    def metrics(self) -> Path:
        """prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``)."""
        return self.root / "metrics"


def run_hub(config: GatewayConfig, paths: RuntimePaths, instance_id: str,
            report: Callable[[dict[str, object]], None]) -> int:
    """Serve until SIGTERM or SIGINT (blocked by the caller: taken here with ``sigwait``).

    ``report`` is called once: ``{"ok": True, "metrics": url}`` when serving, or
    ``{"ok": False, "error": text}`` when the log (or anything else) cannot be opened.
    """
    from gateway.audit import LogServer

    # With [audit] backend = "postgresql" every worker writes to the database itself.
    log_server = None if config.audit.backend == "postgresql" else \
        LogServer(config.audit, paths.audit_socket, instance_id=instance_id)
    metrics: MetricsServer | None = None
    try:
        if log_server is not None:
            log_server.start()
        metrics, url = _serve_metrics(config, paths)
    except (GatewayError, OSError) as err:
        text = err.diagnostics() if isinstance(err, GatewayError) else str(err)
        report({"ok": False, "error": text, "config": isinstance(err, ConfigError)})
        if metrics is not None:
            metrics.stop()
        return 2
    report({"ok": True, "metrics": url})
    received = signal.sigwait({signal.SIGTERM, signal.SIGINT})
    log.info("%s: closing the audit log", signal.Signals(received).name)
    if metrics is not None:
        metrics.stop()
    if log_server is not None:
        log_server.stop()  # pending commits finish; a final signed checkpoint
    log.info("hub stopped")
    return 0


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
