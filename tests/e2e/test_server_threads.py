"""Fewer handler threads than callers, over mutual TLS: what holds a thread never holds them all.

A gateway runs calls on ``[server] threads`` handler threads (fewer than its callers by
default). Streams hold a thread for their lifetime, and so does a call waiting for its
request message; one caller holding every stream slot and every slow-read slot it can get
must still leave the other callers' unary calls served. Checked as an effect: the held
streams and reads are still held after the other caller's calls all succeeded. The streams
are server reflection's (bidirectional: its handler waits on a thread for the next request);
a health Watch holds no thread (grpc's health servicer answers it without blocking one).
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.config import ServerSettings
from gateway.devenv import make_demo_env, start_gateway
from tests.conftest import channel_credentials
from tests.support.waiting import wait_for

WAIT = 30.0  # bound on every wait; a test that reaches it has failed
#: Long enough that the slow reads outlast the test: they are held, not timed.
HELD_S = 300.0

#: The shipped defaults, and the smallest pool where the former bound on slow reads (half
#: the threads, beside streams on the other half) would have left no thread at all.
SHAPES = {"defaults": {},
          "four-threads": {"threads": 4, "max_streams": 2, "max_calls_per_identity": 2}}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def held(request, tmp_path_factory):
    shape = {**SHAPES[request.param], "request_timeout_seconds": HELD_S,
             "stream_idle_seconds": HELD_S}
    env = make_demo_env(tmp_path_factory.mktemp(request.param), server=shape)
    gw = start_gateway(env)
    yield gw, ServerSettings(**shape)
    gw.stop()


def _infer_request() -> pb.ModelInferRequest:
    x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    return request


def _watch_refused(channel: grpc.Channel) -> bool:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                      timeout=WAIT)
    try:
        next(watch)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    watch.cancel()
    return False


def test_streams_and_slow_reads_of_one_caller_leave_unary_calls_served(held):
    gw, settings = held
    assert settings.max_streams + settings.slow_reads < settings.threads
    creds = {name: channel_credentials(gw.env, name) for name in ("admin", "scorer")}
    with grpc.secure_channel(gw.target, creds["admin"]) as attacker, \
            grpc.secure_channel(gw.target, creds["scorer"]) as victim:
        holding = threading.Event()

        def one_then_silent():  # a reflection stream kept open after its first answer
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            holding.wait(HELD_S)

        def silent():  # a request stream that sends nothing until the test ends
            yield from ()
            holding.wait(HELD_S)

        reflect = reflection_pb2_grpc.ServerReflectionStub(attacker).ServerReflectionInfo
        streams = [reflect(one_then_silent(), timeout=HELD_S)
                   for _ in range(settings.max_streams)]
        try:
            for stream in streams:  # every stream slot, each holding a thread
                assert next(stream).list_services_response.service
            assert _watch_refused(victim)  # the server's stream slots are all taken

            # Calls that never send their message: as many as the certificate may have
            # waiting and more; past the grace period the server keeps ``slow_reads``.
            stalled = attacker.stream_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString)
            reads = [stalled.future(silent(), timeout=HELD_S)
                     for _ in range(settings.max_pending_requests_per_certificate + 2)]
            cut = wait_for("the reads over the server's bound cut",
                           lambda: [r for r in reads if r.done()]
                           if sum(r.done() for r in reads) >= len(reads) - settings.slow_reads
                           else None)
            assert {r.code() for r in cut} <= {grpc.StatusCode.CANCELLED,
                                               grpc.StatusCode.RESOURCE_EXHAUSTED}

            # The other caller is served, call after call, on the threads left.
            infer = pb_grpc.GRPCInferenceServiceStub(victim).ModelInfer
            for _ in range(20):
                assert infer(_infer_request(), timeout=WAIT).model_name == "demo-mlp"

            # ... while the streams and the slow reads were held all along.
            assert sum(not r.done() for r in reads) == settings.slow_reads
            assert _watch_refused(victim)
        finally:
            holding.set()
            for stream in streams:
                stream.cancel()
