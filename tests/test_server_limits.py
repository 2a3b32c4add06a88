"""The serving layer's limits, on their own (the end-to-end effects are in test_gateway_surface)."""

from __future__ import annotations

import threading

from gateway.config import ServerSettings
from gateway.server._limits import Limits, WorkerPool


def test_limits_count_calls_and_streams_per_identity():
    limits = Limits(ServerSettings(max_calls_per_identity=2, refusal_rate=1.0,
                                   refusal_burst=2), clock=lambda: 0.0)
    assert [limits.enter_call("a") for _ in range(3)] == [True, True, False]
    assert limits.enter_call("b")
    limits.exit_call("a")
    assert limits.enter_call("a")
    assert [limits.refusal_allowed("a") for _ in range(3)] == [True, True, False]
    assert limits.refusal_allowed("b")


def test_an_identity_over_its_share_is_refused_only_while_others_wait():
    pool = WorkerPool(1)
    limits = Limits(ServerSettings(workers=2, max_calls_per_identity=1, max_streams=1), pool)
    release, first_started, second_started = (threading.Event() for _ in range(3))

    def hold() -> None:
        first_started.set()
        release.wait(30)

    try:
        assert limits.enter_call("a") and limits.enter_call("a")  # idle workers: no cap
        pool.submit(hold)
        assert first_started.wait(30)
        pool.submit(second_started.set)  # waits for the only worker ...
        assert pool.waiting == 1 and limits.enter_call("a")  # ... not yet backed up
        pool.submit(lambda: None)
        assert pool.waiting == 2
        assert not limits.enter_call("a")  # backed up: "a" keeps to its share
        assert limits.enter_call("b")
        release.set()
        assert second_started.wait(30)
        assert limits.enter_call("a")
    finally:
        release.set()
        pool.shutdown()
