"""Opening the configured backend: :func:`open_state`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import ConfigError
from gateway.state._host import HostCoordinator, HostUsageSink, host_buckets
from gateway.state._local import LocalBuckets, LocalCoordinator
from gateway.state._settings import StateSettings
from gateway.state._types import Buckets, Coordinator
from gateway.state._usage import UsageHandler, UsageSink


@dataclass
class State:
    """What one member (a worker process, a replica) shares with the others.

    ``usage`` is where its monitor hands background scoring (None: score in-process).
    """

    backend: str
    buckets: Buckets
    coordinator: Coordinator
    usage: UsageSink | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    #: Starts this member's candidacy for scoring every member's usage (postgresql);
    #: returns what stops it.
    _scorer: Callable[[UsageHandler], Callable[[], None]] | None = field(default=None,
                                                                         repr=False)

    def score_usage(self, handler: UsageHandler) -> None:
        """Stand for scoring the usage every member hands to ``usage``: with ``postgresql``
        the replica holding the usage lease hands each batch to ``handler`` (its monitor's
        ``score_usage``). No-op for the other backends (the hub scores, or the process)."""
        if self._scorer is not None:
            self._closers.insert(0, self._scorer(handler))
            self._scorer = None

    def close(self) -> None:
        """Flush queued usage, return unspent leases, close connections (idempotent)."""
        closers, self._closers = self._closers, []
        for close in closers:
            close()


def local_state(member: str = "local", *, clock: Callable[[], float] | None = None,
                max_keys: int = 100_000) -> State:
    """This process only: exact buckets, a coordinator whose one member is this process."""
    buckets = LocalBuckets(max_keys=max_keys) if clock is None else \
        LocalBuckets(clock=clock, max_keys=max_keys)
    return State("local", buckets, LocalCoordinator(member))


def open_state(settings: StateSettings, *, member: str) -> State:
    """The state of ``settings.backend`` for ``member`` (its worker or replica id)."""
    s = settings
    if s.backend == "local":
        return local_state(member)
    if s.backend == "host":
        hb = host_buckets(s.socket, member, timeout=s.timeout_seconds,
                          lease_tokens=s.lease_tokens, lease_seconds=s.lease_seconds)
        coordinator = HostCoordinator(s.socket, member, timeout=s.timeout_seconds)
        sink = HostUsageSink(s.socket, member, timeout=s.timeout_seconds)
        return State("host", hb, coordinator, sink,
                     [sink.close, hb.close, coordinator.close])
    return _postgresql(s, member)


def _postgresql(s: StateSettings, member: str) -> State:
    from gateway.db import resolve_dsn
    from gateway.state._lease import LeasedBuckets
    from gateway.state._pgbuckets import PgBucketStore
    from gateway.state._pgusage import PgUsageScorer, PgUsageSink

    dsn = resolve_dsn(s.dsn)
    if importlib.util.find_spec("gateway.state._pgcoord") is None:
        raise ConfigError("[state] backend = \"postgresql\": the PostgreSQL coordinator "
                          "(gateway.state._pgcoord) is not available in this build")
    from gateway.state._pgcoord import PgCoordinator  # type: ignore[import-not-found,unused-ignore]

    store = PgBucketStore(dsn, member, timeout=s.timeout_seconds)
    buckets = LeasedBuckets(store, lease_tokens=s.lease_tokens, lease_seconds=s.lease_seconds)
    coordinator: Coordinator = PgCoordinator(dsn, member)
    sink = PgUsageSink(dsn, member, timeout=s.timeout_seconds)

    def scorer(handler: UsageHandler) -> Callable[[], None]:
        candidate = PgUsageScorer(dsn, member, handler, timeout=s.timeout_seconds)
        candidate.start()
        return candidate.close

    return State("postgresql", buckets, coordinator, sink,
                 [sink.close, buckets.close, store.close, coordinator.close], scorer)
