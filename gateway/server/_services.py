"""Health checking and server reflection, behind the guard like every other service.

Both come from the gRPC libraries; these subclasses only put each RPC inside
``guard.call``, so a caller needs an acceptable identity, is held to the stream limits, and
is audited:

- ``Health.Check`` needs a valid identity. Probes are frequent and alike, so each identity's
  first check per ``[server] summary_interval_seconds`` is a normal audit record and the
  rest are counted into one ``call_summary`` record per interval (reason ``summarised``).
- ``Health.Watch`` needs a valid identity and a stream slot; it holds no worker thread (the
  library answers from the thread that changes the status) and is ended after
  ``stream_max_seconds``.
- ``ServerReflectionInfo`` is the policy action ``reflect`` on ``@gateway`` (it reveals every
  service and message type); it holds a worker for as long as it is open, so it is held to
  the stream limits, idle and total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import overload

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from gateway.server._guard import Guard


class GuardedHealth(health.HealthServicer):
    """``grpc.health.v1.Health`` with every RPC guarded."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self._guard = guard

    def add_to_server(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self, server)

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with self._guard.call(context, rpc="HealthCheck", action=None, summarise=True):
            return super().Check(request, context)

    @overload
    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: None = None) -> health._Watcher: ...
    @overload
    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Callable[..., object]) -> None: ...

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Callable[..., object] | None = None
              ) -> health._Watcher | None:
        with self._guard.call(context, rpc="HealthWatch", action=None, stream="server"):
            return super().Watch(request, context, send_response_callback)


class GuardedReflection(reflection.ReflectionServicer):
    """Server reflection for callers the policy grants ``reflect``."""

    def __init__(self, guard: Guard, service_names: Iterable[str]) -> None:
        super().__init__(service_names)
        self._guard = guard

    def add_to_server(self, server: grpc.Server) -> None:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self, server)

    def ServerReflectionInfo(
            self, request_iterator: Iterable[reflection_pb2.ServerReflectionRequest],
            # The stub also admits grpc.aio contexts; this servicer runs on the threaded server.
            context: grpc.ServicerContext,  # type: ignore[override]
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        with self._guard.call(context, rpc="ServerReflectionInfo", action="reflect",
                              stream="bidi") as call:
            yield from super().ServerReflectionInfo(call.requests(request_iterator), context)
