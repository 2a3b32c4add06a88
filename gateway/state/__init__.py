"""State every process of a host, or every replica of a deployment, must share.

Quotas and explain budgets (token buckets) and changes that must reach every member before an
admin call returns (model load/unload, policy reloads). Three backends behind one API: this
process only (the default), the processes of one host through their hub, or PostgreSQL for
replicas. The domain packages take what they need from here; nothing here imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.state._settings import StateSettings
from gateway.state._types import Applied, Buckets, Coordinator, Handler

if TYPE_CHECKING:
    from gateway.state._pgcoord import PgCoordinator

__all__ = ["Applied", "Buckets", "Coordinator", "Handler", "PgCoordinator", "StateSettings"]


def __getattr__(name: str) -> object:
    # PgCoordinator on first use: a gateway without PostgreSQL never imports its driver.
    if name == "PgCoordinator":
        from gateway.state._pgcoord import PgCoordinator

        return PgCoordinator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
