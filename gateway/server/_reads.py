"""Unary calls served as streams, so that waiting for a request message is bounded.

gRPC's threaded server reads a unary call's request message on a worker thread, before the
handler runs: a client that opens calls and never sends their message holds a worker each,
until its deadline (if it set one), and no handler, identity check or audit record ever
sees it. A few dozen such calls froze every caller. This interceptor hands each unary
method to gRPC as a stream-unary one (the wire format is the same), so the wrapper runs at
once and takes the message itself, watched by :meth:`Limits.start_read`: a call whose
message is late is bounded per client certificate and in all, and cancelled after
``request_timeout_seconds``. Refusals go through the guard like any other (audited,
rate-limited), and so do the worker pool's (a throttled connection's calls beyond those it
may have waiting, refused before their message is read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from gateway.errors import InvalidRequest, QuotaExceeded, StreamEnded
from gateway.server._guard import Guard

Request = TypeVar("Request")
Response = TypeVar("Response")
#: ``first(requests, context)``: a call's one request message, taken from its stream.
First = Callable[[Iterator[Request], grpc.ServicerContext], Request]


class BoundedReads(grpc.ServerInterceptor):
    """Serve every unary-request method as a stream-request one, with a bounded wait for its
    request message (the response side is left as it is)."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        # Method handlers are registered once; their wrapped twins are made once each.
        self._wrapped: dict[int, grpc.RpcMethodHandler[Any, Any]] = {}
        if guard.limits.pool is not None:  # the pool's refusals, like every other, are ours
            guard.limits.pool.overflow = self._overflow

    def _overflow(self, method: str, requests: object, context: grpc.ServicerContext) -> None:
        """Refuse, unread, a call of a throttled connection beyond those it may have
        waiting (:class:`gateway.server._limits.WorkerPool`)."""
        self._guard.refuse(context, method.rsplit("/", 1)[-1], QuotaExceeded(
            "too many calls waiting from this connection while its refused calls are over "
            "their rate; retry later"), "throttled")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               grpc.RpcMethodHandler[Request, Response] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Request, Response] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        wrapped = self._wrapped.get(id(handler))
        if wrapped is None:
            wrapped = self._wrapped[id(handler)] = self._wrap(handler,
                                                              handler_call_details.method)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Request, Response],
              method: str) -> grpc.RpcMethodHandler[Request, Response]:
        """The stream-request twin of a unary-request ``handler``."""
        first: First[Request] = self._first_message(method.rsplit("/", 1)[-1])
        decode, encode = handler.request_deserializer, handler.response_serializer
        if not handler.response_streaming:
            unary = handler.unary_unary
            assert unary is not None  # a unary-unary handler has its behaviour
            return grpc.stream_unary_rpc_method_handler(_Unary(unary, first, method),
                                                        decode, encode)
        behavior = handler.unary_stream
        assert behavior is not None  # a unary-stream handler has its behaviour
        if getattr(behavior, "experimental_non_blocking", False):
            # Health Watch answers from other threads: keep it holding no worker.
            return grpc.stream_stream_rpc_method_handler(_NonBlocking(behavior, first),
                                                         decode, encode)
        return grpc.stream_stream_rpc_method_handler(
            lambda requests, context: behavior(first(requests, context), context),
            decode, encode)

    def _first_message(self, rpc: str) -> First[Any]:
        """``first(requests, context)``: the call's one request, waited for under watch."""
        guard = self._guard
        limits = guard.limits

        def first(requests: Iterator[Request], context: grpc.ServicerContext) -> Request:
            read = limits.start_read(context)
            if read is None:
                guard.refuse(context, rpc, QuotaExceeded(
                    "this client keeps calls open without sending their request; its calls "
                    "are refused for a while"), "request-timeout")
            try:
                request = next(requests)
            except StopIteration:
                read.release()
                guard.refuse(context, rpc, InvalidRequest("no request message"),
                             "invalid-argument")
            except grpc.RpcError:
                read.release()
                if read.ended:  # cut by the watchdog: the message never came
                    guard.refuse(context, rpc, StreamEnded(
                        "the request message did not arrive in time; the call was ended"),
                        "request-timeout")
                raise  # cancelled by the client
            read.release()
            return request

        return first


class _Unary:
    """A unary behaviour served from a request stream, naming its method: grpc leaves a
    registered method's name out of the call, and the worker pool's refusals need it
    (``gateway.server._limits._refusing``)."""

    __slots__ = ("_behavior", "_first", "method")

    def __init__(self, behavior: Callable[[Any, grpc.ServicerContext], Any], first: First[Any],
                 method: str) -> None:
        self._behavior = behavior
        self._first = first
        self.method = method

    def __call__(self, requests: Iterator[object], context: grpc.ServicerContext) -> object:
        return self._behavior(self._first(requests, context), context)


class _NonBlocking:
    """A non-blocking unary-stream behaviour (Health Watch) served from a request stream.

    gRPC reads ``experimental_non_blocking`` and ``experimental_thread_pool`` off the
    behaviour object itself, so the wrapper carries them over.
    """

    def __init__(self, behavior: Callable[..., object], first: First[Any]) -> None:
        self._behavior = behavior
        self._first = first
        self.experimental_non_blocking = True
        self.experimental_thread_pool = getattr(behavior, "experimental_thread_pool", None)

    def __call__(self, requests: Iterator[object], context: grpc.ServicerContext,
                 send_response_callback: Callable[[object], None] | None = None) -> object:
        return self._behavior(self._first(requests, context), context, send_response_callback)
