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
        if handler is None:
            return handler
        wrapped = self._wrapped.get(id(handler))
        if wrapped is None:
            wrapped = self._wrapped[id(handler)] = self._wrap(handler,
                                                              handler_call_details.method)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Request, Response],
              method: str) -> grpc.RpcMethodHandler[Request, Response]:
        """The stream-request twin of a unary-request ``handler``, and for every handler a
        behaviour that names its method (:class:`_Behaviour`)."""
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.request_streaming:  # (server reflection) only named
            if handler.response_streaming:
                assert handler.stream_stream is not None
                return grpc.stream_stream_rpc_method_handler(
                    _Behaviour(handler.stream_stream, method), decode, encode)
            assert handler.stream_unary is not None
            return grpc.stream_unary_rpc_method_handler(
                _Behaviour(handler.stream_unary, method), decode, encode)
        first: First[Request] = self._first_message(method.rsplit("/", 1)[-1])
        if not handler.response_streaming:
            assert handler.unary_unary is not None  # a unary-unary handler has its behaviour
            return grpc.stream_unary_rpc_method_handler(
                _Behaviour(handler.unary_unary, method, first), decode, encode)
        assert handler.unary_stream is not None  # a unary-stream handler has its behaviour
        return grpc.stream_stream_rpc_method_handler(
            _Behaviour(handler.unary_stream, method, first), decode, encode)

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


class _Behaviour:
    """A method's behaviour as handed to gRPC: served from a request stream when ``first``
    is given (the call's one message, taken under watch), and naming its ``method`` (gRPC
    leaves a registered method's name out of the call, and the worker pool's refusals need
    it: ``gateway.server._limits._refusing``).

    gRPC reads ``experimental_non_blocking`` and ``experimental_thread_pool`` off the
    behaviour object itself (Health Watch answers from other threads and holds no worker),
    so they are carried over.
    """

    __slots__ = ("_behavior", "_first", "experimental_non_blocking",
                 "experimental_thread_pool", "method")

    def __init__(self, behavior: Callable[..., Any], method: str,
                 first: First[Any] | None = None) -> None:
        self._behavior = behavior
        self._first = first
        self.method = method
        self.experimental_non_blocking = getattr(behavior, "experimental_non_blocking", False)
        self.experimental_thread_pool = getattr(behavior, "experimental_thread_pool", None)

    def __call__(self, requests: Iterator[object], context: grpc.ServicerContext,
                 *callback: Callable[[object], None]) -> object:
        # (a non-blocking behaviour gets gRPC's send_response_callback as a third argument)
        request = requests if self._first is None else self._first(requests, context)
        return self._behavior(request, context, *callback)
