"""The serving layer's limits, on their own (the end-to-end effects are in test_gateway_surface)."""

from __future__ import annotations

import re
import threading
import types
from concurrent.futures import Future, wait

import grpc
import pytest

from gateway.config import ServerSettings, load_config
from gateway.errors import ConfigError
from gateway.server._limits import Limits, WorkerPool, _connection, _refusing
from gateway.server._reads import _Behaviour

WAIT = 30.0  # bound on every wait; a test that reaches it has failed


# --- what may hold a thread, against the threads there are ---------------------------------

def test_the_defaults_run_fewer_threads_than_callers_and_leave_unary_calls_threads():
    s = ServerSettings()
    assert s.threads < s.workers  # fewer handler threads than the calls taken as ordinary
    assert s.max_streams + s.slow_reads < s.threads
    assert s.max_calls_per_identity <= s.threads // 2


def test_streams_and_slow_reads_together_never_hold_every_thread():
    for threads in range(2, 65):
        for streams in range(1, threads // 2 + 1):
            s = ServerSettings(threads=threads, max_streams=streams, max_calls_per_identity=1)
            assert s.slow_reads >= 0
            assert s.max_streams + s.slow_reads < threads, (threads, streams)


@pytest.mark.parametrize(("server", "named"), [
    ({"threads": 6, "max_streams": 4}, "max_streams (4) must be at most half the threads (6)"),
    ({"threads": 8, "max_calls_per_identity": 5},
     "max_calls_per_identity (5) must be at most half the threads (8)"),
    ({"threads": 1, "max_streams": 1, "max_calls_per_identity": 1},
     "max_streams (1) must be at most half the threads (1)"),
    ({"threads": 0}, "threads must be at least 1"),
])
def test_settings_where_one_kind_of_call_could_hold_every_thread_are_refused(
        tmp_path, server, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        ServerSettings(**server)
    config = tmp_path / "gateway.toml"
    config.write_text("[server]\n" + "".join(f"{k} = {v}\n" for k, v in server.items()))
    with pytest.raises(ConfigError, match=r"\[server\] "):
        load_config(config)


class _Waiting:
    """A unary call's context as the read watch sees it: its certificate, and ``cancel``."""

    def __init__(self, cert: bytes) -> None:
        self.cert = cert
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def test_slow_reads_beyond_the_servers_bound_are_cut_though_their_certificate_may_have_more():
    settings = ServerSettings(threads=4, max_streams=2, max_calls_per_identity=2,
                              max_pending_requests_per_certificate=4,
                              request_timeout_seconds=300.0)
    assert settings.slow_reads == 1
    limits = Limits(settings, peer_key=lambda context: context.cert)
    calls = [_Waiting(b"cert-a") for _ in range(3)]
    reads = [limits.start_read(call) for call in calls]  # type: ignore[arg-type]
    assert all(reads)
    for call in calls[1:]:  # past the grace period: the first stays, the others are cut
        assert call.cancelled.wait(WAIT)
    assert not calls[0].cancelled.is_set()
    assert reads[0] is not None and reads[0].slow
    assert [r.ended for r in reads[1:] if r is not None] == ["pending", "pending"]
    # Its certificate is now stalling: its next call is refused before it waits.
    assert limits.start_read(_Waiting(b"cert-a")) is None  # type: ignore[arg-type]
    reads[0].release()


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
        assert first_started.wait(WAIT)
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


# --- the worker pool: connections in turn, throttled connections paused ---------------------

class _Call:
    def __init__(self, peer: bytes) -> None:
        self._peer = peer

    def peer(self) -> bytes:
        return self._peer


class _Event:
    """What grpc passes the pool for each call: an event whose call names the connection."""

    def __init__(self, peer: bytes) -> None:
        self.call = _Call(peer)
        self.call_details = types.SimpleNamespace(method=b"/t.T/M")


def _in_pool(event, state, behavior, request):  # stands in for grpc's per-call function
    return behavior(request(), event)


def _submit(pool: WorkerPool, peer: bytes, job) -> Future:
    """Submit ``job`` as grpc submits a call: ``(context.run, in-pool function, event, state,
    behaviour, request thunk)``."""
    return pool.submit(lambda f, *args: f(*args), _in_pool, _Event(peer), None,
                       lambda request, context: job(), lambda: None)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pool_serves_connections_in_turn():
    pool = WorkerPool(1)
    release, holding = threading.Event(), threading.Event()
    order: list[str] = []
    try:
        _submit(pool, b"a", lambda: (holding.set(), release.wait(WAIT)))
        assert holding.wait(WAIT)
        done = [_submit(pool, b"a", lambda i=i: order.append(f"a{i}")) for i in range(4)]
        done.append(_submit(pool, b"b", lambda: order.append("b")))
        assert pool.waiting == 5
        release.set()
        wait(done, WAIT)
        # First come, first served would run b last, behind a's whole queue.
        assert order == ["a0", "b", "a1", "a2", "a3"]
        assert pool.waiting == 0
    finally:
        release.set()
        pool.shutdown()


def test_a_throttled_connection_runs_one_call_at_a_time_after_a_pause():
    clock = _Clock()
    pool = WorkerPool(4, throttle_seconds=60.0, clock=clock)
    release = threading.Event()
    running: list[str] = []
    started = {name: threading.Event() for name in ("a1", "a2")}

    def call(name: str, seconds: float = 0.0):
        def run() -> None:
            started[name].set()
            running.append(name)
            clock.now += seconds  # the call "takes" this long
        return run

    try:
        pool.throttle(b"a")
        busy = threading.Event()
        _submit(pool, b"b", lambda: (busy.set(), release.wait(WAIT)))  # another is served
        assert busy.wait(WAIT)
        first = _submit(pool, b"a", call("a1", 1.0))
        second = _submit(pool, b"a", call("a2"))
        first.result(WAIT)
        # The pause after a 1 s call is 9 s (a tenth of a worker's time at most); a call of
        # another connection wakes the workers meanwhile, and a2 still waits.
        clock.now += 8.9
        _submit(pool, b"c", lambda: None).result(WAIT)
        assert not started["a2"].is_set() and pool.backlog() == 0 and pool.waiting == 1
        clock.now += 0.2
        _submit(pool, b"c", lambda: None).result(WAIT)
        second.result(WAIT)
        assert running == ["a1", "a2"]
    finally:
        release.set()
        pool.shutdown()


def test_a_throttled_connection_alone_is_not_paused():
    clock = _Clock()
    pool = WorkerPool(2, throttle_seconds=60.0, clock=clock)
    try:
        pool.throttle(b"a")
        calls = [_submit(pool, b"a", lambda: setattr(clock, "now", clock.now + 1.0))
                 for _ in range(3)]
        wait(calls, WAIT)  # no other connection's call ran: nobody waits for a's pauses
        assert all(c.done() and c.exception() is None for c in calls)
    finally:
        pool.shutdown()


def test_a_throttled_connection_is_served_again_once_its_throttle_ends():
    clock = _Clock()
    pool = WorkerPool(2, throttle_seconds=5.0, clock=clock)
    release = threading.Event()
    try:
        pool.throttle(b"a")
        assert pool.is_throttled(b"a")
        busy = threading.Event()
        _submit(pool, b"b", lambda: (busy.set(), release.wait(WAIT)))
        assert busy.wait(WAIT)
        _submit(pool, b"a", lambda: setattr(clock, "now", clock.now + 1.0)).result(WAIT)
        held = _submit(pool, b"a", lambda: None)
        pool.throttle(b"a", extend_only=True)  # refused again at 101: throttled until 106
        clock.now = 105.9
        _submit(pool, b"c", lambda: None).result(WAIT)
        assert not held.done()
        clock.now = 106.0
        _submit(pool, b"c", lambda: None).result(WAIT)
        held.result(WAIT)
        assert not pool.is_throttled(b"a")
        pool.throttle(b"a", extend_only=True)  # not throttled: nothing to extend
        assert not pool.is_throttled(b"a")
    finally:
        release.set()
        pool.shutdown()


def test_throttled_calls_beyond_those_held_are_refused_unread():
    clock = _Clock()
    pool = WorkerPool(3, hold=3, throttle_seconds=60.0, clock=clock)
    refused: list[str] = []
    pool.overflow = lambda method, requests, context: refused.append(method)
    release = threading.Event()
    try:
        pool.throttle(b"a")
        busy = threading.Event()
        _submit(pool, b"b", lambda: (busy.set(), release.wait(WAIT)))
        assert busy.wait(WAIT)
        one = threading.Event()
        _submit(pool, b"a", lambda: (one.set(), release.wait(WAIT)))
        assert one.wait(WAIT)
        held = [_submit(pool, b"a", lambda: None) for _ in range(3)]
        assert pool.backlog() == 0 and pool.waiting == 3  # held back, and not a backlog
        beyond = _submit(pool, b"a", lambda: None)  # a fourth waiting: over `hold` ...
        held[0].result(WAIT)  # ... so the first in line is refused instead of its handler
        assert refused == ["/t.T/M"]
        assert pool.waiting == 3 and not any(c.done() for c in (*held[1:], beyond))
        unthrottled = _submit(pool, b"c", lambda: None)  # never held, whatever waits
        unthrottled.result(WAIT)
    finally:
        release.set()
        pool.shutdown()


def test_the_pool_reads_the_connection_of_each_grpc_call():
    """The pool's scheduling rests on what grpc passes ``submit``: checked on a real server,
    so a grpc upgrade that changes it fails here rather than turning fairness off."""
    seen: list[tuple[bytes, bool]] = []

    class Spy(WorkerPool):
        def submit(self, fn, /, *args, **kwargs):
            seen.append(_connection(args))
            return super().submit(fn, *args, **kwargs)

    peers: list[str] = []

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        peers.append(context.peer())
        return request

    def streamed(request: bytes, context: grpc.ServicerContext):
        yield request

    handler = grpc.method_handlers_generic_handler("t.T", {
        "U": grpc.unary_unary_rpc_method_handler(unary),
        "S": grpc.unary_stream_rpc_method_handler(streamed)})
    pool = Spy(2)
    server = grpc.server(pool, handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary("/t.T/U")(b"x", timeout=WAIT) == b"x"
            assert list(channel.unary_stream("/t.T/S")(b"y", timeout=WAIT)) == [b"y"]
    finally:
        server.stop(None)
        pool.shutdown()
    assert seen == [(peers[0].encode(), True), (peers[0].encode(), False)]
    assert peers[0].startswith("ipv4:127.0.0.1:")


def test_a_pool_refusal_names_a_registered_method():
    """grpc leaves a registered method's name (every gateway method is one) out of the call
    event; a call the pool refuses unread is still recorded under its method, read off the
    serving layer's wrapped behaviour, a unary call's or a request stream's alike. Checked on
    a real server and grpc's real arguments."""
    names: list[str] = []

    class Spy(WorkerPool):
        def submit(self, fn, /, *args, **kwargs):
            refuse = _refusing(args, lambda method, requests, context: names.append(method))
            refuse[3](None, None)
            return super().submit(fn, *args, **kwargs)

    pool = Spy(2)
    server = grpc.server(pool)
    server.add_registered_method_handlers("t.T", {
        "U": grpc.stream_unary_rpc_method_handler(_Behaviour(
            lambda request, context: request, "/t.T/U", lambda requests, context: next(requests))),
        # a request stream of its own (server reflection's kind): named, not read
        "S": grpc.stream_stream_rpc_method_handler(_Behaviour(
            lambda requests, context: requests, "/t.T/S"))})
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary("/t.T/U")(b"x", timeout=WAIT) == b"x"
            assert list(channel.stream_stream("/t.T/S")(iter([b"y"]), timeout=WAIT)) == [b"y"]
    finally:
        server.stop(None)
        pool.shutdown()
    assert names == ["/t.T/U", "/t.T/S"]


def test_a_refusal_over_the_rate_throttles_its_connection_and_later_ones_extend_it():
    class Context:
        def peer(self) -> str:
            return "ipv4:127.0.0.1:5"

    clock = _Clock()
    pool = WorkerPool(2, clock=clock)
    limits = Limits(ServerSettings(refusal_rate=1.0, refusal_burst=2), pool, clock=clock)
    try:
        assert pool.throttle_seconds == 2.0  # one refill of the bucket
        assert limits.refusal_allowed("x", Context()) and limits.refusal_allowed("x", Context())
        assert not pool.is_throttled(b"ipv4:127.0.0.1:5")
        assert not limits.refusal_allowed("x", Context())
        assert pool.is_throttled(b"ipv4:127.0.0.1:5")
        clock.now += 1.5  # one token back: recorded, and the throttle runs from now
        assert limits.refusal_allowed("x", Context())
        clock.now += 1.9
        _submit(pool, b"ipv4:127.0.0.1:5", lambda: None).result(WAIT)
        assert pool.is_throttled(b"ipv4:127.0.0.1:5")
    finally:
        pool.shutdown()
