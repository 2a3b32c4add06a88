"""What keeps one caller from holding the server: concurrency, stream time and refusal limits.

The gRPC server runs every call on one of ``[server] workers`` threads. Three limits keep
any one identity (or certificate) from taking them all, each answered RESOURCE_EXHAUSTED:

- **unary calls in progress** per identity (``max_calls_per_identity``), enforced while the
  server is backed up (``workers`` calls or more wait for a worker; :class:`WorkerPool`
  counts them): an identity may use idle workers, and a busy client is served at full
  concurrency, but a flood queued ahead of other callers is cut back to its share and
  answered at once, so their calls reach a worker;
- **streams** (server reflection, health Watch) open at once, in all and per identity
  (``max_streams``, ``max_streams_per_identity``); ``max_streams`` is at most half the
  workers, so streams can never starve unary calls. A stream is ended (CANCELLED) when the
  caller has sent nothing for ``stream_idle_seconds`` or it has been open for
  ``stream_max_seconds``: a watchdog thread cancels it, which wakes the worker it held;
- **refused calls** (unauthenticated, denied, over a limit, malformed) per identity or, for a
  certificate that is not an identity, per certificate: a token bucket of ``refusal_rate``
  a second and ``refusal_burst`` at once. Within it each refusal is an audit record as
  before; beyond it the call is answered RESOURCE_EXHAUSTED, costs no durable write, and is
  counted into a summary record instead.

**Summaries**, not one record per call, are how refused floods and health probes reach the
audit log without the log itself being the denial-of-service vector: per (caller, RPC,
reason, status) a counter, written as one ``call_summary`` record per
``summary_interval_seconds`` (the server's health loop drains them). Health checks are
recorded individually once per identity per interval (the first), the rest are counted.
Every table here is bounded (LRU); what no longer fits is folded into one entry.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from gateway.config import ServerSettings

#: Keys (identities, certificates) each table tracks; the least recently seen go first.
MAX_KEYS = 4096
#: The key summaries fold into when the table is full.
OTHER = "(other)"


class WorkerPool(ThreadPoolExecutor):
    """The server's worker threads, counting the calls that wait for one."""

    def __init__(self, workers: int) -> None:
        super().__init__(max_workers=workers, thread_name_prefix="rpc")
        self._count_lock = threading.Lock()
        #: Calls submitted and not yet started.
        self.waiting = 0

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[no-untyped-def]
        with self._count_lock:
            self.waiting += 1

        def run():  # type: ignore[no-untyped-def]
            with self._count_lock:
                self.waiting -= 1
            return fn(*args, **kwargs)

        return super().submit(run)


@dataclass
class _Bucket:
    tokens: float
    last: float


class Stream:
    """One open stream's slot: ``touch`` on each message; ``ended`` says why it was cut."""

    __slots__ = ("_limits", "context", "deadline", "ended", "idle_limit", "key", "last",
                 "released")

    def __init__(self, limits: Limits, key: str, context: grpc.ServicerContext,
                 now: float, idle: bool) -> None:
        self._limits = limits
        self.key = key
        self.context = context
        self.last = now
        self.deadline = now + limits.settings.stream_max_seconds
        self.idle_limit = limits.settings.stream_idle_seconds if idle else None
        #: "idle" or "total" once the watchdog has cut the stream.
        self.ended: str | None = None
        self.released = False

    def touch(self) -> None:
        self.last = self._limits.clock()

    def release(self) -> None:
        self._limits._release_stream(self)


class Limits:
    """The limits of the module docstring, for one server; every method is thread-safe."""

    def __init__(self, settings: ServerSettings, pool: WorkerPool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.pool = pool
        self.clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}
        self._streams: dict[str, int] = {}
        self._open: set[Stream] = set()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._first: OrderedDict[tuple[str, str], float] = OrderedDict()
        # (caller id, certificate sha256, rpc, reason, status) -> [count, first wall ms]
        self._summaries: dict[tuple[str | None, str | None, str, str, str], list[int]] = {}
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Stream]] = []
        self._seq = 0
        self._watchdog: threading.Thread | None = None

    # -- unary calls -------------------------------------------------------------------------

    def enter_call(self, key: str) -> bool:
        """Take one of ``key``'s unary slots; False if it holds its share while the server is
        backed up: at least ``workers`` calls wait for a worker (without a pool: whenever
        it holds its share)."""
        with self._lock:
            held = self._calls.get(key, 0)
            if held >= self.settings.max_calls_per_identity and (
                    self.pool is None or self.pool.waiting >= self.settings.workers):
                return False
            self._calls[key] = held + 1
            return True

    def exit_call(self, key: str) -> None:
        with self._lock:
            held = self._calls.get(key, 0) - 1
            if held > 0:
                self._calls[key] = held
            else:
                self._calls.pop(key, None)

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
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="stream-limits",
                                                  daemon=True)
                self._watchdog.start()
        if not context.add_callback(stream.release):  # the RPC has ended already
            stream.release()
        return stream

    def open_streams(self) -> int:
        return len(self._open)

    def _schedule(self, stream: Stream, now: float) -> None:
        """With the lock held: wake the watchdog when ``stream`` next needs a look."""
        due = stream.deadline
        if stream.idle_limit is not None:
            due = min(due, stream.last + stream.idle_limit)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, stream))
        self._wake.notify()

    def _release_stream(self, stream: Stream) -> None:
        with self._lock:
            if stream.released:
                return
            stream.released = True
            self._open.discard(stream)
            held = self._streams.get(stream.key, 0) - 1
            if held > 0:
                self._streams[stream.key] = held
            else:
                self._streams.pop(stream.key, None)

    def _watch(self) -> None:
        """Cancel streams past their idle or total limit (the one thread that does)."""
        while True:
            cut: list[Stream] = []
            with self._lock:
                while not self._heap:
                    self._wake.wait()
                now = self.clock()
                while self._heap and self._heap[0][0] <= now:
                    _, _, stream = heapq.heappop(self._heap)
                    if stream.released:
                        continue
                    if now >= stream.deadline:
                        stream.ended = "total"
                    elif stream.idle_limit is not None and \
                            now >= stream.last + stream.idle_limit:
                        stream.ended = "idle"
                    else:  # it was touched since: look again later
                        self._schedule(stream, now)
                        continue
                    cut.append(stream)
                if not cut:
                    self._wake.wait(max(0.0, self._heap[0][0] - now) if self._heap else None)
            for stream in cut:
                stream.context.cancel()  # wakes the worker blocked on the stream

    # -- refusals and summaries ------------------------------------------------------------

    def refusal_allowed(self, key: str) -> bool:
        """Take a token from ``key``'s refusal bucket; False when it is empty."""
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
