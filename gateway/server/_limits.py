"""What keeps one caller from holding the server: concurrency, stream time and refusal limits.

The gRPC server runs every call on one of ``[server] threads`` handler threads, usually
fewer than its callers (``workers`` is the scale of its queues). Three limits keep any one
identity (or certificate) from taking them all, each answered RESOURCE_EXHAUSTED; their
bounds against ``threads`` are checked by :class:`ServerSettings`:

- **unary calls in progress** per identity (``max_calls_per_identity``, at most half the
  threads), enforced while the server is backed up (``workers`` calls or more wait for a
  thread, not counting those a throttled connection has waiting;
  :meth:`WorkerPool.backlog`): an identity may use idle threads, and a busy client is
  served at full concurrency, but a flood queued ahead of other callers is cut back to
  its share and answered at once, so their calls reach a thread;
- **streams** (server reflection, health Watch) open at once, in all and per identity
  (``max_streams``, ``max_streams_per_identity``); ``max_streams`` is at most half the
  threads, so streams can never starve unary calls. A stream is ended (CANCELLED) when the
  caller has sent nothing for ``stream_idle_seconds`` or it has been open for
  ``stream_max_seconds``: a watchdog thread cancels it, which wakes the worker it held;
- **calls waiting for their request message**: gRPC's threaded server reads a unary call's
  message on the worker, so a client that opens calls and never sends the message would
  hold a worker each, before any handler (or identity check) runs. Every unary method is
  therefore served as a stream (:mod:`gateway.server._reads`) and its wait watched: a
  message missing after a grace period makes the call *slow*, and at most
  ``max_pending_requests_per_certificate`` slow calls of one client certificate, and
  ``ServerSettings.slow_reads`` in all (half the threads streams leave: streams and slow
  reads together never hold every thread), may go on waiting, for at most
  ``request_timeout_seconds``; the others are cancelled (CANCELLED, recorded with reason
  ``request-timeout``);
- **refused calls** (unauthenticated, denied, over a limit, malformed) per identity or, for a
  certificate that is not an identity, per certificate: a token bucket of ``refusal_rate``
  a second and ``refusal_burst`` at once. Within it each refusal is an audit record as
  before; beyond it the call is answered RESOURCE_EXHAUSTED, costs no durable write, and is
  counted into a summary record instead.

**Scheduling** (:class:`WorkerPool`): the threads take the client connections' calls in
turn, and a connection over its refusal rate is *throttled*: its calls wait and run one at
a time with pauses, so that a flood of refused calls, which costs the interpreter about as
much as a served one, cannot take the other callers' turns at it.

**Summaries**, not one record per call, are how refused floods and health probes reach the
audit log without the log itself being the denial-of-service vector: per (caller, RPC,
reason, status) a counter, written as one ``call_summary`` record per
``summary_interval_seconds`` (the server's health loop drains them). Health checks are
recorded individually once per identity per interval (the first), the rest are counted.
Every table here is bounded (LRU); what no longer fits is folded into one entry.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import grpc

from gateway.config import ServerSettings

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
Key = TypeVar("Key")

#: Keys (identities, certificates) each table tracks; the least recently seen go first.
MAX_KEYS = 4096
#: Shortest sleep of the watchdog between passes (time limits are this coarse).
_TICK_S = 0.1
#: How long a unary call may wait for its request message before it counts as slow.
_READ_GRACE_S = 0.25
#: The key summaries fold into when the table is full.
OTHER = "(other)"
#: The most of one worker's time a throttled connection keeps busy while others are served.
THROTTLED_SHARE = 0.1
_PAUSE = 1 / THROTTLED_SHARE - 1
#: How long no other call must have run for a throttled connection to be served unpaused.
_IDLE_S = 0.01


class WorkerPool(ThreadPoolExecutor):
    """The server's handler threads (``[server] threads``), shared among client connections
    rather than first come, first served; connections over their refusal rate are
    *throttled*.

    gRPC hands every call to ``submit`` as ``(context.run, <in-pool function>, rpc_event,
    ...)``; the event's call names the connection (its peer address), read without a lock
    or a copy of the certificate. Each connection has its own queue and free workers take
    the connections' first calls in turn, so a flood queued on one connection does not
    stand ahead of another connection's call.

    One Python process executes one thread at a time: a flood that keeps workers busy
    takes the other callers' turns at the interpreter however the queue is ordered, so its
    calls must not start as fast as it sends them. A connection with a call refused beyond
    its caller's refusal rate (:meth:`throttle`) stays throttled until it has had no
    refused call for ``throttle_seconds``:

    - its calls run one at a time, and after each the next waits ``_PAUSE`` times as long
      as that call took, so it keeps at most ``THROTTLED_SHARE`` of one worker's time;
    - but while no other connection's call has run for ``_IDLE_S`` it is served without
      pausing: nobody waits for the worker, so a lone client is not slowed;
    - at most ``hold`` calls (the server gives 4 x ``[server] workers``, half of its
      ``maximum_concurrent_rpcs``) wait on throttled connections in all; beyond that the
      first call of the longest line is answered, without its handler or its request
      message, by :attr:`overflow` (the serving layer's refusal: RESOURCE_EXHAUSTED,
      recorded or counted like any refusal), so throttled clients cannot make the gateway
      hold calls without bound (grpc counts them against ``maximum_concurrent_rpcs``).
      A client with more calls in flight than that gets those refusals as fast as it
      sends, and the pauses no longer bound what its calls cost (bench/README.md).

    Otherwise nothing is refused here: calls wait, and the guard answers them as before.
    Streamed responses (reflection, health Watch) are scheduled like any call but never
    held or counted as busy: the stream limits bound them, and they last.

    A ``ThreadPoolExecutor`` to grpc (which asks for one), with its own workers and queues.
    """

    def __init__(self, workers: int, *, hold: int = 0, throttle_seconds: float = 4.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_workers=workers)  # unused: submit and shutdown are replaced
        self._max = workers
        self._hold = hold or workers * 4
        self.throttle_seconds = throttle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        #: Connections with calls waiting, in the order they are served next.
        self._queues: OrderedDict[bytes, deque[_Job]] = OrderedDict()
        self._throttled: OrderedDict[bytes, _Throttle] = OrderedDict()
        self._workers: list[threading.Thread] = []
        #: Idle workers, each blocked on its own held lock until released (a call arrived).
        self._sleeping: list[threading.Lock] = []
        self._timer = math.inf  # when the idle worker watching the throttled pauses wakes
        self._busy = 0  # calls running, not counting throttled ones and streams
        self._quiet_since = clock()  # when _busy last fell to 0
        self._shutdown = False
        #: Calls submitted and not yet started.
        self.waiting = 0
        #: ``overflow(method, requests, context)``: run instead of the handler of a throttled
        #: connection's call beyond the ``hold`` that may wait; it must end the call.
        self.overflow: Callable[[str, Any, grpc.ServicerContext], Any] | None = None

    # -- what grpc calls -------------------------------------------------------------------

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        peer, counted = _connection(args)
        future: Future[T] = Future()
        job = _Job(future, fn, args, kwargs, peer, counted)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            queue = self._queues.get(peer)
            if queue is None:
                queue = self._queues[peer] = deque()
            queue.append(job)
            self.waiting += 1
            sleeper = self._sleeping.pop() if self._sleeping else None
            if sleeper is None and len(self._workers) < self._max:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"rpc-{len(self._workers)}")
                self._workers.append(thread)
                thread.start()
        if sleeper is not None:
            sleeper.release()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop once every submitted call has run (``cancel_futures``: drop those waiting)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                for queue in self._queues.values():
                    for job in queue:
                        job.future.cancel()
                self._queues.clear()
                self.waiting = 0
            self._throttled.clear()
            sleeping, self._sleeping = self._sleeping, []
            threads = list(self._workers)
        for sleeper in sleeping:
            sleeper.release()
        if wait:
            for thread in threads:
                thread.join()

    # -- throttling ------------------------------------------------------------------------

    def throttle(self, peer: bytes, *, extend_only: bool = False) -> None:
        """Throttle ``peer``'s connection from now (``extend_only``: only if it already is)."""
        until = self._clock() + self.throttle_seconds
        with self._lock:
            throttle = self._throttled.get(peer)
            if throttle is not None:
                throttle.until = until
                self._throttled.move_to_end(peer)
            elif not extend_only:
                self._throttled[peer] = _Throttle(until)
                if len(self._throttled) > MAX_KEYS:
                    self._throttled.popitem(last=False)

    def is_throttled(self, peer: bytes) -> bool:
        return peer in self._throttled

    def backlog(self) -> int:
        """Calls waiting for a worker, not counting those throttling holds back."""
        with self._lock:
            return self.waiting - sum(
                len(q) for p, q in self._queues.items()
                if p in self._throttled and q[0].counted)

    # -- the workers -----------------------------------------------------------------------

    def _work(self) -> None:
        wake = threading.Lock()
        wake.acquire()
        job: _Job | None = None
        while True:
            with self._lock:
                if job is not None:
                    self._finished(job)
                job, due = self._pick()
                if job is None:
                    if self._shutdown and not self._queues:
                        return
                    self._sleeping.append(wake)
                    timeout = -1.0
                    if due is not None and due < self._timer:
                        self._timer = due  # this worker wakes for the next pause's end
                        timeout = max(0.0, due - self._clock())
            if job is None:
                woken = wake.acquire(timeout=timeout)
                if not woken or timeout >= 0:
                    relay = None
                    with self._lock:
                        popped = wake not in self._sleeping
                        if not popped:
                            self._sleeping.remove(wake)
                        if self._timer == due:
                            self._timer = math.inf
                            if woken and self._sleeping and self._queues:
                                # Woken for a call while watching a pause: another idle
                                # worker takes over the watch (this one may be long busy).
                                relay = self._sleeping.pop()
                    if relay is not None:
                        relay.release()
                    if not woken and popped:  # a caller took it as it timed out: its
                        wake.acquire()  # release is on its way (a lock is released once)
                continue
            if job.overflow and self.overflow is not None:
                job.args = _refusing(job.args, self.overflow)
            if job.future.set_running_or_notify_cancel():
                try:
                    result = job.fn(*job.args, **job.kwargs)
                except BaseException as err:  # the future carries it, as in ThreadPoolExecutor
                    job.ended = self._clock() if job.low else 0.0
                    job.future.set_exception(err)
                else:
                    job.ended = self._clock() if job.low else 0.0
                    job.future.set_result(result)
            elif job.low:
                job.ended = job.started
            job.fn = job.args = job.kwargs = None  # type: ignore[assignment]  # free them now

    def _pick(self) -> tuple[_Job | None, float | None]:
        """With the lock held: the next call to start; else when to look again (None: when
        a call arrives or ends)."""
        throttled = self._throttled
        held: list[bytes] = []
        waiting = 0  # calls throttling holds back
        for peer, queue in self._queues.items():
            if throttled and queue[0].counted and peer in throttled:
                held.append(peer)
                waiting += len(queue)
                continue
            return self._take(peer, queue), None
        if not held:
            return None, None
        now = self._clock()
        for peer in held:
            if now >= throttled[peer].until:  # served as usual from now on
                del throttled[peer]
                return self._take(peer, self._queues[peer]), None
        if waiting > self._hold:  # refuse, unread, the first call of the longest line
            peer = max(held, key=lambda p: len(self._queues[p]))
            return self._take(peer, self._queues[peer], overflow=True), None
        due = None
        for peer in held:
            throttle = throttled[peer]
            if throttle.running:
                continue
            start = throttle.next_start
            if not self._busy:
                start = min(start, self._quiet_since + _IDLE_S)
            if now >= start:
                throttle.running = True
                return self._take(peer, self._queues[peer], now), None
            due = start if due is None else min(due, start)
        return None, due

    def _take(self, peer: bytes, queue: deque[_Job], throttled_at: float = 0.0, *,
              overflow: bool = False) -> _Job:
        """With the lock held: start ``queue``'s first call (``throttled_at``: as a throttled
        connection's, at that time; ``overflow``: to be refused at once)."""
        job = queue.popleft()
        if queue:
            self._queues.move_to_end(peer)
        else:
            del self._queues[peer]
        self.waiting -= 1
        if throttled_at:
            job.low, job.started = True, throttled_at
        elif overflow:
            job.overflow = True
        elif job.counted:
            self._busy += 1
        return job

    def _finished(self, job: _Job) -> None:
        """With the lock held: ``job`` has run."""
        if job.low:
            throttle = self._throttled.get(job.peer)
            if throttle is not None:
                throttle.running = False
                throttle.next_start = job.ended + (job.ended - job.started) * _PAUSE
        elif job.counted and not job.overflow:
            self._busy -= 1
            if not self._busy:
                self._quiet_since = self._clock()


class _Job:
    __slots__ = ("args", "counted", "ended", "fn", "future", "kwargs", "low", "overflow",
                 "peer", "started")

    def __init__(self, future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], peer: bytes, counted: bool) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.peer = peer
        #: Held and counted as busy like any call (False: a streamed response).
        self.counted = counted
        #: Run as a throttled connection's call, from ``started`` to ``ended``.
        self.low = False
        self.started = self.ended = 0.0
        #: Beyond what its throttled connection may have waiting: refused unread.
        self.overflow = False


class _Throttle:
    __slots__ = ("next_start", "running", "until")

    def __init__(self, until: float) -> None:
        self.until = until
        self.next_start = 0.0
        self.running = False


def _refusing(args: tuple[Any, ...], overflow: Callable[[str, Any, grpc.ServicerContext], Any],
              ) -> tuple[Any, ...]:
    """grpc's arguments for one call with its behaviour replaced by ``overflow``:
    ``(<in-pool function>, rpc_event, state, behaviour, request thunk, ...)``.

    The method is the call event's, but grpc leaves it empty for a registered method (every
    method of ours): then the behaviour's ``method``, which the serving layer's wrapped
    behaviours carry (:mod:`gateway.server._reads`)."""
    method = args[1].call_details.method or getattr(args[3], "method", "")
    name = method.decode("utf-8", "replace") if isinstance(method, bytes) else str(method)

    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        return overflow(name, requests, context)

    return (*args[:3], refuse, *args[4:])


def _connection(args: tuple[Any, ...]) -> tuple[bytes, bool]:
    """The connection (peer address) of a call grpc submits, and whether it is scheduled
    as a call (False for streamed responses); ``(b"", True)`` for anything else."""
    try:
        peer = args[1].call.peer()
    except (IndexError, AttributeError):
        return b"", True
    return peer, getattr(args[0], "__name__", "") != "_stream_response_in_pool"


@dataclass
class _Bucket:
    tokens: float
    last: float


class Stream:
    """One open stream's slot: ``touch`` on each message; ``ended`` says why it was cut."""

    __slots__ = ("_limits", "context", "deadline", "ended", "idle_limit", "key", "last",
                 "released")

    def __init__(self, limits: Limits, key: str, context: grpc.ServicerContext,
                 now: float, idle: bool, seconds: float | None = None) -> None:
        self._limits = limits
        self.key = key
        self.context = context
        self.last = now
        self.deadline = now + (limits.settings.stream_max_seconds if seconds is None
                               else seconds)
        self.idle_limit = limits.settings.stream_idle_seconds if idle else None
        #: "idle" or "total" once the watchdog has cut the stream.
        self.ended: str | None = None
        self.released = False

    def touch(self) -> None:
        self.last = self._limits.clock()

    def release(self) -> None:
        self._limits._release_stream(self)


class PendingRead(Stream):
    """A unary call waiting for its request message; ``release`` once it has arrived."""

    __slots__ = ("cert", "slow")

    def __init__(self, limits: Limits, context: grpc.ServicerContext, now: float,
                 seconds: float) -> None:
        super().__init__(limits, "", context, now, False, seconds)
        #: The client certificate's key (``Limits.peer_key``), read at the grace deadline.
        self.cert = b""
        #: Past the grace period and counted against its certificate.
        self.slow = False

    def release(self) -> None:
        self._limits._release_read(self)


class Limits:
    """The limits of the module docstring, for one server; every method is thread-safe."""

    def __init__(self, settings: ServerSettings, pool: WorkerPool | None = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 peer_key: Callable[[grpc.ServicerContext], bytes] = lambda context: b"",
                 ) -> None:
        self.settings = settings
        self.pool = pool
        if pool is not None:  # throttled until the connection's refusal bucket is full again
            pool.throttle_seconds = settings.refusal_burst / settings.refusal_rate
        #: The client certificate of a call, as the key of its slow-request count.
        self.peer_key = peer_key
        self.clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}
        self._streams: dict[str, int] = {}
        self._open: set[Stream] = set()
        self._reads: dict[bytes, int] = {}
        self._reading = 0
        self._stalled: OrderedDict[bytes, float] = OrderedDict()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._first: OrderedDict[tuple[str, str], float] = OrderedDict()
        # (caller id, certificate sha256, rpc, reason, status) -> [count, first wall ms]
        self._summaries: dict[tuple[str | None, str | None, str, str, str], list[int]] = {}
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Stream]] = []
        # Unary calls waiting for their message, in the order they started: all have the
        # same grace period, so this is deadline order too, and a call costs an append and
        # a pop instead of two heap operations on a heap of every call of the last 0.25 s.
        self._fresh: deque[PendingRead] = deque()
        self._seq = 0
        self._watchdog: threading.Thread | None = None

    # -- unary calls -------------------------------------------------------------------------

    def enter_call(self, key: str) -> bool:
        """Take one of ``key``'s unary slots; False if it holds its share while the server is
        backed up: at least ``workers`` calls wait for a thread (without a pool: whenever
        it holds its share)."""
        with self._lock:
            held = self._calls.get(key, 0)
            if held >= self.settings.max_calls_per_identity and (
                    self.pool is None or self.pool.backlog() >= self.settings.workers):
                return False
            self._calls[key] = held + 1
            return True

    def exit_call(self, key: str) -> None:
        with self._lock:
            _decrement(self._calls, key)

    # -- streams ---------------------------------------------------------------------------

    def open_stream(self, key: str, context: grpc.ServicerContext, *,
                    idle: bool = True) -> Stream | None:
        """A stream slot for ``key`` (released when the RPC ends), or None if over a limit.

        ``idle=False`` for server-streaming RPCs, where the caller sends nothing after the
        request: only the total time limit applies.
        """
        now = self.clock()
        s = self.settings
        with self._lock:
            held = self._streams.get(key, 0)
            if held >= s.max_streams_per_identity or len(self._open) >= s.max_streams:
                return None
            stream = Stream(self, key, context, now, idle)
            self._streams[key] = held + 1
            self._open.add(stream)
            self._schedule(stream, now)
            self._start_watchdog()
        if not context.add_callback(stream.release):  # the RPC has ended already
            stream.release()
        return stream

    def start_read(self, context: grpc.ServicerContext) -> PendingRead | None:
        """A unary call starts waiting for its request message: watched from now on.

        Nearly always the message is there already and :meth:`PendingRead.release` follows
        at once. One still missing after ``_READ_GRACE_S`` is *slow*: it may stay only if its
        client certificate has fewer than ``max_pending_requests_per_certificate`` slow
        calls and the server fewer than ``ServerSettings.slow_reads``; otherwise, and in any
        case after ``request_timeout_seconds``, the watchdog cancels it. A certificate with a call
        cancelled for being over its count is *stalling* for ``request_timeout_seconds``:
        its new calls get None (to be refused at once), so it cannot keep every worker
        waiting through grace periods either.
        """
        now = self.clock()
        if self._stalled and self._stalling(self.peer_key(context), now):
            return None
        read = PendingRead(self, context, now, _READ_GRACE_S)
        with self._lock:
            self._fresh.append(read)
            if len(self._fresh) == 1:  # else the watchdog looks at the first one earlier
                self._start_watchdog()
                self._wake.notify()
        return read

    def _stalling(self, key: bytes, now: float) -> bool:
        with self._lock:
            until = self._stalled.get(key)
            if until is None:
                return False
            if now < until:
                return True
            del self._stalled[key]
            return False

    def _slow_read(self, read: PendingRead, now: float) -> bool:
        """With the lock held, at the grace deadline: keep ``read`` waiting (True) or not."""
        s = self.settings
        try:
            read.cert = self.peer_key(read.context)
        except Exception:  # a call gone meanwhile: nothing to keep waiting
            return False
        held = self._reads.get(read.cert, 0)
        if held >= s.max_pending_requests_per_certificate or self._reading >= s.slow_reads:
            self._stalled[read.cert] = now + s.request_timeout_seconds
            self._stalled.move_to_end(read.cert)
            if len(self._stalled) > MAX_KEYS:
                self._stalled.popitem(last=False)
            return False
        self._reads[read.cert] = held + 1
        self._reading += 1
        read.slow = True
        read.deadline = read.last + s.request_timeout_seconds
        self._schedule(read, now)
        return True

    def _release_read(self, read: PendingRead) -> None:
        with self._lock:
            if read.released:
                return
            read.released = True
            if not read.slow:
                return
            self._reading -= 1
            _decrement(self._reads, read.cert)

    def _start_watchdog(self) -> None:
        """With the lock held: the watchdog thread runs from the first slot on."""
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="stream-limits",
                                              daemon=True)
            self._watchdog.start()

    def open_streams(self) -> int:
        return len(self._open)

    def _schedule(self, stream: Stream, now: float) -> None:
        """With the lock held: wake the watchdog when ``stream`` next needs a look."""
        due = stream.deadline
        if stream.idle_limit is not None:
            due = min(due, stream.last + stream.idle_limit)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, stream))
        if self._heap[0][2] is stream:  # else the watchdog wakes earlier anyway
            self._wake.notify()

    def _release_stream(self, stream: Stream) -> None:
        with self._lock:
            if stream.released:
                return
            stream.released = True
            self._open.discard(stream)
            _decrement(self._streams, stream.key)

    def _watch(self) -> None:
        """Cancel streams past their idle or total limit (the one thread that does)."""
        while True:
            cut: list[Stream] = []
            with self._lock:
                while not self._heap and not self._fresh:
                    self._wake.wait()
                now = self.clock()
                fresh = self._fresh
                while fresh and fresh[0].deadline <= now:  # past the grace period
                    read = fresh.popleft()
                    if read.released:
                        continue
                    if self._slow_read(read, now):
                        continue
                    read.ended = "pending"
                    cut.append(read)
                while self._heap and self._heap[0][0] <= now:
                    _, _, stream = heapq.heappop(self._heap)
                    if stream.released:
                        continue
                    if now >= stream.deadline:  # a slow read's included (fresh ones: above)
                        stream.ended = "total"
                    elif stream.idle_limit is not None and \
                            now >= stream.last + stream.idle_limit:
                        stream.ended = "idle"
                    else:  # it was touched since: look again later
                        self._schedule(stream, now)
                        continue
                    cut.append(stream)
                if not cut:  # at most one pass a tick: slots come and go by the thousand
                    due = min(self._heap[0][0] if self._heap else math.inf,
                              fresh[0].deadline if fresh else math.inf)
                    self._wake.wait(max(_TICK_S, due - now) if due < math.inf else None)
            for stream in cut:
                try:
                    stream.context.cancel()  # wakes the worker blocked on the stream
                except Exception:  # the watchdog must outlive any one call
                    log.exception("could not cancel a stream past its limit")

    # -- refusals and summaries ------------------------------------------------------------

    def refusal_allowed(self, key: str, context: grpc.ServicerContext | None = None) -> bool:
        """Take a token from ``key``'s refusal bucket; False when it is empty.

        With the refused call's ``context``, its connection is throttled when the bucket
        is empty (see :class:`WorkerPool`), and stays throttled while it is refused.
        """
        allowed = self._take_token(key)
        pool = self.pool
        if context is not None and pool is not None and (not allowed or pool._throttled):
            pool.throttle(context.peer().encode(), extend_only=allowed)
        return allowed

    def _take_token(self, key: str) -> bool:
        s = self.settings
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(s.refusal_burst), now)
                if len(self._buckets) > MAX_KEYS:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket.tokens = min(float(s.refusal_burst),
                                    bucket.tokens + (now - bucket.last) * s.refusal_rate)
                bucket.last = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return True
            return False

    def first_in_window(self, key: str, rpc: str) -> bool:
        """True for ``key``'s first ``rpc`` call in the current summary interval."""
        now = self.clock()
        with self._lock:
            start = self._first.get((key, rpc))
            if start is not None and now - start < self.settings.summary_interval_seconds:
                return False
            self._first[(key, rpc)] = now
            self._first.move_to_end((key, rpc))
            if len(self._first) > MAX_KEYS:
                self._first.popitem(last=False)
            return True

    def count(self, caller_id: str | None, cert_sha256: str | None, rpc: str, reason: str,
              status: str) -> None:
        """Count one call into its summary (written by :meth:`drain`)."""
        key = (caller_id, cert_sha256, rpc, reason, status)
        with self._lock:
            entry = self._summaries.get(key)
            if entry is None:
                if len(self._summaries) >= MAX_KEYS:
                    key = (OTHER, None, rpc, reason, status)
                    entry = self._summaries.get(key)
                if entry is None:
                    entry = self._summaries[key] = [0, time.time_ns() // 1_000_000]
            entry[0] += 1

    def drain(self, *, everything: bool = False) -> list[dict[str, object]]:
        """The ``call_summary`` records due (a full interval old), or all of them."""
        now_ms = time.time_ns() // 1_000_000
        interval_ms = int(self.settings.summary_interval_seconds * 1000)
        out = []
        with self._lock:
            for key, (count, start_ms) in list(self._summaries.items()):
                if everything or now_ms - start_ms >= interval_ms:
                    del self._summaries[key]
                    caller_id, cert_sha256, rpc, reason, status = key
                    out.append({
                        "caller": {"id": caller_id, "cert_sha256": cert_sha256},
                        "rpc": rpc, "reason": reason, "status": status, "count": count,
                        "window": {"start_ms": start_ms, "end_ms": now_ms},
                    })
        return out


def _decrement(counts: dict[Key, int], key: Key) -> None:
    """One fewer for ``key``; a count that reaches 0 leaves the table (it stays bounded)."""
    held = counts.get(key, 0) - 1
    if held > 0:
        counts[key] = held
    else:
        counts.pop(key, None)
