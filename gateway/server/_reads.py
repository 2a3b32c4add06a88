"""Unary calls served as streams, so that waiting for a request message is bounded.

gRPC's threaded server reads a unary call's request message on a worker thread, before the
handler runs: a client that opens calls and never sends their message holds a worker each,
until its deadline (if it set one), and no handler, identity check or audit record ever
sees it. A few dozen such calls froze every caller. This interceptor hands each unary
method to gRPC as a stream-unary one (the wire format is the same), so the wrapper runs at
once and takes the message itself, watched by :meth:`Limits.start_read`: a call whose
message is late is bounded per client certificate and in all, and cancelled after
``request_timeout_seconds``. Refusals go through the guard like any other (audited,
rate-limited).
"""

from __future__ import annotations

import grpc

from gateway.errors import InvalidRequest, QuotaExceeded, StreamEnded
from gateway.server._guard import Guard


class BoundedReads(grpc.ServerInterceptor):
    """Serve every unary-request method as a stream-request one, with a bounded wait for its
    request message (the response side is left as it is)."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        # Method handlers are registered once; their wrapped twins are made once each.
        self._wrapped: dict[int, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        wrapped = self._wrapped.get(id(handler))
        if wrapped is None:
            wrapped = self._wrapped[id(handler)] = self._wrap(handler,
                                                              handler_call_details.method)
        return wrapped

    def _wrap(self, handler, method: str) -> grpc.RpcMethodHandler:  # type: ignore[no-untyped-def]
        """The stream-request twin of a unary-request ``handler``."""
        first = self._first_message(method.rsplit("/", 1)[-1])
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if not handler.response_streaming:
            behavior = handler.unary_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, context: behavior(first(requests, context), context), **codec)
        behavior = handler.unary_stream
        if getattr(behavior, "experimental_non_blocking", False):
            # Health Watch answers from other threads: keep it holding no worker.
            def watch(requests, context, send_response_callback=None):  # type: ignore[no-untyped-def]
                return behavior(first(requests, context), context, send_response_callback)

            watch.experimental_non_blocking = True
            watch.experimental_thread_pool = getattr(behavior, "experimental_thread_pool",
                                                     None)
            return grpc.stream_stream_rpc_method_handler(watch, **codec)
        return grpc.stream_stream_rpc_method_handler(
            lambda requests, context: behavior(first(requests, context), context), **codec)

    def _first_message(self, rpc: str):  # type: ignore[no-untyped-def]
        """``first(requests, context)``: the call's one request, waited for under watch."""
        guard = self._guard
        limits = guard.limits

        def first(requests, context):  # type: ignore[no-untyped-def]
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
