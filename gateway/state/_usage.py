"""Usage rows handed from workers to the hub, where one monitor scores every worker's traffic."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Usage:
    """One request's rows for background scoring, as a worker's monitor queues them."""

    model: str
    caller: str
    x: np.ndarray
    y: np.ndarray | None
    #: The model's profile (its profile.json bytes, as the worker verified them) and their
    #: SHA-256, so the hub parses each profile once; both empty when the model has none.
    profile: bytes = b""
    profile_digest: str = ""


#: The hub's side: called with the sending member's id and a batch of its usage.
UsageHandler = Callable[[str, list[Usage]], None]


class UsageSink(Protocol):
    """Where a worker's monitor hands its background scoring (instead of its own thread)."""

    def submit(self, usage: Usage) -> bool:
        """Queue one request's usage; False when it cannot be (queue full, hub gone)."""
        ...

    def flush(self) -> None:
        """Send what is queued now (also at shutdown)."""
        ...

    def on_dropped(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(n)`` whenever ``n`` requests are dropped unscored (queue full, or
        the hub unreachable when their batch was sent), for the monitor's metric."""
        ...


log = logging.getLogger("gateway.state")


class BatchingSink:
    """The queue both usage sinks share: :meth:`submit` only appends (no I/O on the request
    path); a thread of the sink's own sends what is queued every ``interval_s`` as one batch.
    What cannot be queued (backlog full, sink closed) or sent is dropped and counted through
    :meth:`on_dropped`, and an outage is logged once, not once per batch.

    Subclasses name where batches go (``target``) and send one batch with :meth:`_send`,
    raising one of ``failures`` when they cannot.
    """

    target = "its destination"
    failures: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, *, max_backlog: int, interval_s: float, thread_name: str) -> None:
        self._max = max_backlog
        self._interval = interval_s
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # batches leave one at a time, in order
        self._queue: list[Usage] = []
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        #: Requests dropped: backlog full, sink closed, or their batch could not be sent.
        self.dropped = 0
        self._failing = False
        self._on_dropped: Callable[[int], None] = lambda n: None

    def submit(self, usage: Usage) -> bool:
        with self._lock:
            if len(self._queue) >= self._max or self._closed.is_set():
                self._drop(1)
                return False
            self._queue.append(usage)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name,
                                                daemon=True)
                self._thread.start()
        return True

    def on_dropped(self, callback: Callable[[int], None]) -> None:
        self._on_dropped = callback

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._on_dropped(n)

    def _run(self) -> None:
        while not self._closed.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        """Send what is queued now as one batch (dropped and counted if it cannot be)."""
        with self._flush_lock:
            with self._lock:
                batch, self._queue = self._queue, []
            if not batch:
                return
            try:
                self._send(batch)
            except self.failures as err:
                self._drop(len(batch))
                if not self._failing:  # once per outage, not once per batch
                    log.warning("state: usage not handed to %s, so not scored, until it is "
                                "back (%d request(s) so far): %s", self.target, len(batch),
                                str(err).strip())
                self._failing = True
                return
            if self._failing:
                log.warning("state: usage reaches %s again (%d request(s) went unscored)",
                            self.target, self.dropped)
            self._failing = False

    def _send(self, batch: list[Usage]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the thread and send what is still queued."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
