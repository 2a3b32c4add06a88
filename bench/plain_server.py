"""Baseline for `make bench`: a plain, insecure OIP server doing the same ModelInfer work.

Same gRPC framework, thread pool, codec and ONNX Runtime session options as the gateway,
but by default no TLS, no identity, no policy and no audit: the ratio gateway/plain is the
price of the security the gateway adds. Never use this outside the benchmark.

    python -m bench.plain_server REPOSITORY [CERTS_DIR]   # prints "listening on 127.0.0.1:PORT"
    python -m bench.plain_server REPOSITORY CERTS_DIR --audit CONFIG
    python -m bench.plain_server REPOSITORY --aio         # the same work on grpc.aio

With CERTS_DIR (server.pem, server.key, ca.pem) it requires client certificates, as the
gateway does, so the benchmark can tell the price of mTLS from the price of the rest.

``--audit CONFIG`` adds the other part the gateway core must do on every call: the audit
log of CONFIG's ``[audit]`` section (the gateway's own AuditLog: canonical record, hash
chain, Merkle tree, group commit, O_DSYNC) takes one record per call, durable before the
response leaves. The record holds just the request id and the status; there is no identity,
policy, quota or scoring. So this server is the floor the issue's requirements set: what
mutual TLS plus a durable audit record cost, before any of the gateway's own decisions.

``--processes N`` runs N such servers behind one port (SO_REUSEPORT, each forked before any
gRPC object exists), as ``[server] processes`` does for the gateway: N against N.

``--aio`` serves the same ModelInfer from a grpc.aio server (handlers on one event loop):
a reference for how much of the baseline is grpc-python's threaded server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from concurrent import futures
from pathlib import Path

import grpc
import onnxruntime as ort

from gateway._proto.inference import grpc_service_pb2 as pb
from gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
from gateway.audit import AuditLog
from gateway.config import load_config
from gateway.inference import decode_inputs, encode_outputs, requested_outputs
from gateway.models import ModelRepository


class PlainServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository) -> None:
        self._models = repository

    def ModelInfer(self, request, context):
        model = self._models.get(request.model_name, request.model_version)
        feeds = decode_inputs(request, model, max_elements=16 * 1024 * 1024)
        outputs = requested_outputs(request, model)
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version,
                                         id=request.id)
        encode_outputs(response, model.run(feeds, outputs), outputs)
        return response


class DurableServicer(PlainServicer):
    """:class:`PlainServicer` plus one durable audit record per call (see the module doc)."""

    def __init__(self, repository: ModelRepository, audit: AuditLog) -> None:
        super().__init__(repository)
        self._audit = audit

    def ModelInfer(self, request, context):
        self._audit.announce()  # as the gateway does: lets group commit gather calls in flight
        response = super().ModelInfer(request, context)
        self._audit.append("decision", {"request_id": request.id, "status": "OK"})
        return response


class AioPlainServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The same work as :class:`PlainServicer`, as a coroutine run on the event loop."""

    def __init__(self, repository: ModelRepository) -> None:
        self._plain = PlainServicer(repository)

    async def ModelInfer(self, request, context):
        return self._plain.ModelInfer(request, context)


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def _load(repository: str) -> ModelRepository:
    models = ModelRepository(Path(repository), session_options=_options, verify=None)
    models.load_all()
    return models


def main(repository: str, certs: str | None = None, audit_config: str | None = None,
         workers: int = 16, port: int = 0, ready_fd: int = -1) -> None:
    models = _load(repository)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.so_reuseport", 1 if port else 0)])
    if audit_config:
        audit = AuditLog.open(load_config(audit_config).audit, instance_id="bench-floor")
        servicer: PlainServicer = DurableServicer(models, audit)
    else:
        servicer = PlainServicer(models)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if certs:
        directory = Path(certs)
        credentials = grpc.ssl_server_credentials(
            [((directory / "server.key").read_bytes(), (directory / "server.pem").read_bytes())],
            root_certificates=(directory / "ca.pem").read_bytes(), require_client_auth=True)
        port = server.add_secure_port(f"127.0.0.1:{port}", credentials)
    else:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    if ready_fd >= 0:  # one of --processes: the parent announces the port
        os.write(ready_fd, b"x")
        os.close(ready_fd)
    else:
        print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def serve_processes(processes: int, repository: str, certs: str | None) -> None:
    """``processes`` plain servers on one port; the parent only reserves it and waits."""
    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    children = []
    for _ in range(processes):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            main(repository, certs, port=port, ready_fd=write_fd)
            os._exit(0)
        os.close(write_fd)
        os.read(read_fd, 1)
        os.close(read_fd)
        children.append(pid)
    print(f"listening on 127.0.0.1:{port}", flush=True)

    def stop(*_: object) -> None:
        for child in children:
            os.kill(child, signal.SIGTERM)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in children:
        os.wait()


async def _serve_aio(repository: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(AioPlainServicer(_load(repository)),
                                                       server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.plain_server")
    parser.add_argument("repository")
    parser.add_argument("certs", nargs="?")
    parser.add_argument("--audit", metavar="CONFIG")
    parser.add_argument("--aio", action="store_true")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--workers", type=int, default=16,
                        help="handler threads (the gateway's [server] threads)")
    args = parser.parse_args()
    if args.audit and not args.certs:
        parser.error("--audit is the floor of the gateway: it needs CERTS_DIR (mutual TLS)")
    if args.processes > 1:
        serve_processes(args.processes, args.repository, args.certs)
    elif args.aio:
        asyncio.run(_serve_aio(args.repository))
    else:
        main(args.repository, args.certs, args.audit, workers=args.workers)
