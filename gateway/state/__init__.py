"""State every process of a host, or every replica of a deployment, must share.

    state = open_state(config.state, member="host:8443/w0")
    state.buckets.take("quota:spiffe://d/alice", rate=5.0, burst=10)   # True: admitted
    state.coordinator.subscribe("models", apply_model_change)
    state.coordinator.apply_everywhere("models", "iris/1", {"op": "load"}, timeout=30)
    state.close()

Quotas and explain budgets (token buckets), changes that must reach every member before an
admin call returns (model load/unload, policy reloads), and where usage for extraction
detection is scored. Three backends behind one API (``[state] backend``):

``local`` (default)
    This process only: exact buckets; the coordinator's one member is this process; the
    monitor scores on its own thread.
``host``
    The worker processes of one host, through their hub (:class:`StateServer`, run by the
    hub process, on a Unix socket 0600 in a 0700 directory). Buckets are leased in batches
    (below); the hub keeps the desired state of every coordinated key, pushes each change to
    every connected worker and collects their answers (a worker that does not answer in time
    is named), and replays the desired state to a worker that subscribes later. Workers hand
    their background-scoring rows to the hub in batches (``State.usage``), so one monitor sees
    a caller's traffic across every worker and scoring leaves the workers' GIL.
``postgresql``
    Replicas sharing one database (``dsn``): buckets are rows leased with one
    ``UPDATE ... RETURNING``; the coordinator is PostgreSQL's (``PgCoordinator``). Members
    insert their usage batches into a table; the one member holding the usage lease
    (``State.score_usage``) scores them all, in insertion order, each at most once
    (:mod:`._pgusage`).

**The bound of leased buckets** (host and postgresql). A member takes ``lease_tokens`` tokens
of a shared bucket at once (more if one call needs more) and spends them without a round
trip; tokens it has not spent within ``lease_seconds`` go back. Every token spent was taken
from the shared bucket, so over any interval ``t`` all members together admit **at most
burst + rate * t**, never more than one exact bucket. The approximation only ever refuses
early: while other members hold unspent leased tokens, a call may be refused that one exact
bucket would have admitted: **at most (members - 1) * lease_tokens** such tokens per key at a
time, each back in the shared bucket within ``lease_seconds``. A member the shared bucket
refused refuses that key locally until the bucket could have refilled what it asked for (at
most ``lease_seconds``), so a refused caller's flood costs no round trip per call.

**Failing closed.** When the hub or the database cannot answer, a quota or budget check
raises :class:`~gateway.errors.StateUnavailable` (UNAVAILABLE) and the member drops the
tokens it held; it reconnects by itself on a later call. A hub that restarts starts with full
buckets (at most one extra burst per key) and, without a ``state_file``, an empty desired
state; workers keep what they applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.state._hub import StateServer
from gateway.state._lease import LeasedBuckets
from gateway.state._local import LocalBuckets, LocalCoordinator
from gateway.state._open import State, local_state, open_state
from gateway.state._settings import StateSettings
from gateway.state._types import Applied, Buckets, Coordinator, Handler
from gateway.state._usage import Usage, UsageHandler, UsageSink

if TYPE_CHECKING:
    from gateway.state._pgcoord import PgCoordinator

__all__ = ["Applied", "Buckets", "Coordinator", "Handler", "LeasedBuckets", "LocalBuckets",
           "LocalCoordinator", "PgCoordinator", "State", "StateServer", "StateSettings",
           "Usage", "UsageHandler", "UsageSink", "local_state", "open_state"]


def __getattr__(name: str) -> object:
    # PgCoordinator on first use: a gateway without PostgreSQL never imports its driver.
    if name == "PgCoordinator":
        from gateway.state._pgcoord import PgCoordinator

        return PgCoordinator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
