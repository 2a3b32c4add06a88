"""Anomaly scoring off the request path: a bounded queue and one worker thread.

Detection, metrics and alerts still see every request, but the response does not wait, and
the numpy work runs on one thread instead of on every RPC worker at once (numpy releases and
re-takes the GIL inside small operations, so many workers scoring at once contend for it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from gateway.monitor._metrics import Metrics
from gateway.monitor._profile import InputProfile

log = logging.getLogger("gateway.monitor")

#: One queued request: model key, profile, caller, input rows, predictions (or None).
Item = tuple[str, InputProfile | None, str, np.ndarray, np.ndarray | None]
Score = Callable[..., object]
#: Passes in a row that find no work before the worker waits to be woken: until then it
#: looks for work every interval by itself, so traffic with short gaps (calls finishing
#: together at a group commit) never has a request wake it.
IDLE_PASSES = 20
ObserveOutput = Callable[[str, np.ndarray, InputProfile | None], None]


class BackgroundScorer:
    """Queues requests (at most ``max_backlog``; beyond, counted as unscored) and scores
    them every ``interval_s`` with ``score`` and ``observe_output`` (the monitor's own)."""

    def __init__(self, score: Score, observe_output: ObserveOutput, metrics: Metrics, *,
                 max_backlog: int, interval_s: float) -> None:
        self._score = score
        self._observe_output = observe_output
        self._metrics = metrics
        self._max_backlog = max_backlog
        self._interval = interval_s
        self._backlog: deque[Item] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._idle = False  # the worker waits for work (set and cleared under _ready)
        self._worker: threading.Thread | None = None

    def submit(self, model_key: str, profile: InputProfile | None, caller_id: str,
               x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Queue one request's rows (and predictions) for the next pass.

        Without a lock on the request path: deque appends and pops are atomic, and the
        worker is woken (under the lock) only when it has gone idle, after
        :data:`IDLE_PASSES` passes found nothing: under steady traffic no request wakes it
        (each wake-up hands the GIL between threads), only the first after a quiet spell.
        The backlog bound is approximate by at most the number of RPC threads submitting at
        the same moment.
        """
        if len(self._backlog) >= self._max_backlog:
            self._metrics.unscored.inc()
            return
        self._backlog.append((model_key, profile, caller_id, x, y))
        if self._worker is None or self._idle:
            with self._ready:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._run, name="monitor-scoring",
                                                    daemon=True)
                    self._worker.start()
                self._ready.notify()

    def _run(self) -> None:
        quiet = 0  # passes in a row that found nothing to score
        while True:
            if quiet >= IDLE_PASSES:
                with self._ready:
                    # A submit that appends after this check sees _idle set, so it notifies.
                    self._idle = True
                    while not self._backlog:
                        self._ready.wait()
                    self._idle = False
            # Let requests accumulate: one pass over many rows costs about what one row does,
            # and the RPC threads are interrupted once per interval, not once per request.
            time.sleep(self._interval)
            quiet = 0 if self.flush() else quiet + 1

    def flush(self) -> int:
        """Score everything queued now (also at shutdown); returns how many requests."""
        backlog, items = self._backlog, []
        try:
            for _ in range(len(backlog)):
                items.append(backlog.popleft())  # atomic: submitters never wait on a lock
        except IndexError:  # another flush (shutdown, a test) took the rest meanwhile
            pass
        # The requests of one caller to one model are scored as one batch: the detectors
        # (all per caller) see the same rows in the same order, with a fraction of the numpy
        # calls (each of which may hand the GIL to the RPC threads and back), also when
        # concurrent callers' requests interleave in the queue.
        runs: dict[tuple[str, int, str, tuple[int, ...]], list[Item]] = {}
        for item in items:
            runs.setdefault((item[0], id(item[1]), item[2], item[3].shape[1:]), []).append(item)
        for run in runs.values():
            key, profile, caller, x, _y = run[0]
            try:
                rows = x if len(run) == 1 else np.concatenate([i[3] for i in run])
                self._score(key, profile, caller, rows, requests=len(run))
                outputs = [i[4] for i in run if i[4] is not None]
                if outputs and all(o.shape[1:] == outputs[0].shape[1:] for o in outputs):
                    self._observe_output(key, np.concatenate(outputs), profile)
            except Exception:  # a bad row must not stop monitoring
                log.exception("background anomaly scoring failed")
        return len(items)
