"""The ``[state]`` settings table: where shared quotas, budgets and coordinated changes live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError

BACKENDS = ("local", "host", "postgresql")


@dataclass(frozen=True)
class StateSettings:
    """The ``[state]`` table (see :mod:`gateway.state` for what each backend shares)."""

    #: ``local``: this process only (one process, the default). ``host``: every worker
    #: process of this host, through the hub's Unix socket (the supervisor sets this for its
    #: workers). ``postgresql``: every replica sharing the database ``dsn``.
    backend: str = "local"
    #: The hub's Unix socket (backend ``host``); its directory is made 0700, the socket 0600.
    socket: Path = Path("var/run/state.sock")
    #: PostgreSQL connection string (backend ``postgresql``); empty: ``$GATEWAY_DSN``.
    dsn: str = ""
    #: Tokens a member leases from a shared bucket at once and then spends without a round
    #: trip (a call that needs more leases what it needs). Larger: fewer round trips, more
    #: tokens idle in one member while another is refused (see the bound in gateway.state).
    lease_tokens: int = 8
    #: Seconds after which tokens leased but not spent go back to the shared bucket.
    lease_seconds: float = 0.25
    #: Seconds a request to the hub or the database may take before it counts as unanswered
    #: (the quota check then fails closed: UNAVAILABLE).
    timeout_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"[state] backend must be one of {', '.join(BACKENDS)}, "
                              f"got {self.backend!r}")
        if self.lease_tokens < 1:
            raise ConfigError("[state] lease_tokens must be at least 1")
        for name in ("lease_seconds", "timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[state] {name} must be positive")
