"""Group commit's wait for announced records: one rule for the file log's commits
(:class:`~gateway.audit._log.AuditLog`) and a worker's frames to the hub
(:class:`~gateway.audit._remote.RemoteLog`).

The server announces a call when it starts; the call's record arrives when it ends. A
committer (or a sender) about to write waits, at most the window, until every announced
record has arrived, so that under load one write (one frame, one flush) carries many. An
announcement is only a hint: calls that never append must not delay every commit, so when
the window runs out the count is forgotten and the next announcements start afresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Gathering:
    """Announced records not yet arrived, and the committer waiting for them.

    Every method is called with the owner's lock held (the lock given here, which the wait
    releases): the owner's queue and this count change together.
    """

    __slots__ = ("_arrived", "_expected", "_gathering", "_window")

    def __init__(self, lock: threading.Lock, window_us: float) -> None:
        self._arrived = threading.Condition(lock)
        self._expected = 0
        self._gathering = False
        self._window = window_us / 1e6

    def announce(self) -> None:
        """A call has started that will append one record when it ends."""
        self._expected += 1

    def arrive(self) -> None:
        """One record has been queued: it consumes an announcement; the last one wakes the
        committer gathering (only it: an arriving record wakes no other thread)."""
        if self._expected > 0:
            self._expected -= 1
        if self._gathering and self._expected == 0:
            self._arrived.notify()

    def wait(self, go_on: Callable[[], bool]) -> None:
        """Wait (the lock released meanwhile) until every announced record has arrived, the
        window has run out, or ``go_on()`` turns false (the log closing, the hub gone)."""
        if self._window <= 0 or self._expected == 0:
            return
        deadline = time.monotonic() + self._window
        self._gathering = True
        try:
            while self._expected > 0 and go_on():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._expected = 0
                    break
                self._arrived.wait(remaining)
        finally:
            self._gathering = False

    def interrupt(self) -> None:
        """Wake a committer gathering: nothing more will come (close, a lost connection)."""
        self._arrived.notify_all()
