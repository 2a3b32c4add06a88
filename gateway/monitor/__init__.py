"""Monitoring and anomaly detection (stub: being built, see issue 6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MonitorSettings:
    """Metrics listener and anomaly/quota settings."""

    metrics_listen: str = "127.0.0.1:9464"
