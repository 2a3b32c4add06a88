"""`gateway demo init|call`: the demo set-up `make run` performs, and a client to try it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` verb group."""
    parser = subparsers.add_parser("demo", help="demo set-up and a demo client")
    verbs = parser.add_subparsers(dest="demo_command", metavar="VERB", required=True)

    init = verbs.add_parser(
        "init", help="create what is missing: dev PKI, signed demo models, audit log keys")
    init.add_argument("--config", metavar="FILE", help="gateway TOML configuration file")
    init.add_argument("--force", action="store_true", help="recreate everything")
    init.set_defaults(func=_init)

    call = verbs.add_parser("call", help="call the gateway as a demo identity")
    call.add_argument("--target", default="127.0.0.1:8443", help="host:port of the gateway")
    call.add_argument("--certs", type=Path, default=Path("certs/dev"),
                      help="directory with ca.pem and clients/<name>.pem|.key")
    call.add_argument("--as", dest="identity", default="scorer", help="demo client name")
    call.add_argument("--model", default="demo-mlp")
    call.add_argument("--action", choices=("infer", "metadata", "ready"), default="infer")
    call.set_defaults(func=_call)


def _init(args: argparse.Namespace) -> int:
    from gateway.audit import ensure_keys
    from gateway.cli._model_profile import profile_demo_models
    from gateway.config import load_config
    from gateway.identity.pki import init_dev_pki
    from gateway.models.demo import build_demo_repository
    from gateway.models.signing import ensure_demo_signing_key, sign_model

    config = load_config(args.config)
    certs = Path(config.tls.ca).parent
    init_dev_pki(certs, force=args.force)
    print(f"dev PKI in {certs}")
    private_key, _ = ensure_demo_signing_key(certs / "signing")
    repository = config.models.repository
    for directory in build_demo_repository(repository, force=args.force):
        sign_model(directory, key=private_key)
        print(f"demo model {directory} built and signed")
    for directory in sorted(repository.glob("demo-*/*")):
        if not (directory / "model.sig").exists():
            sign_model(directory, key=private_key)
            print(f"demo model {directory} signed")
    for directory in profile_demo_models(repository, private_key, force=args.force):
        print(f"demo model {directory} profiled (anomaly scores) and re-signed")
    ensure_keys(config.audit)
    print(f"audit log keys in {config.audit.signing_key.parent}")
    return 0


def _call(args: argparse.Namespace) -> int:
    import grpc
    import numpy as np

    from gateway._proto.inference import grpc_service_pb2 as pb
    from gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc

    client = args.certs / "clients"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(args.certs / "ca.pem").read_bytes(),
        private_key=(client / f"{args.identity}.key").read_bytes(),
        certificate_chain=(client / f"{args.identity}.pem").read_bytes())
    with grpc.secure_channel(args.target, credentials) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if args.action == "ready":
                response, call = stub.ModelReady.with_call(pb.ModelReadyRequest(name=args.model))
                result = {"ready": response.ready}
            elif args.action == "metadata":
                response, call = stub.ModelMetadata.with_call(
                    pb.ModelMetadataRequest(name=args.model))
                result = {"inputs": [(t.name, t.datatype, list(t.shape)) for t in response.inputs],
                          "outputs": [(t.name, t.datatype, list(t.shape))
                                      for t in response.outputs]}
            else:
                x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
                request = pb.ModelInferRequest(model_name=args.model, raw_input_contents=[
                    x.tobytes()])
                request.inputs.add(name="input", datatype="FP32", shape=x.shape)
                response, call = stub.ModelInfer.with_call(request)
                result = {o.name: np.frombuffer(raw, dtype=np.float32 if o.datatype == "FP32"
                                                else np.int64).tolist()
                          for o, raw in zip(response.outputs, response.raw_output_contents,
                                            strict=True)}
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}")
            return 1
    receipt = dict(call.trailing_metadata() or ())
    print(json.dumps({"identity": args.identity, "action": args.action, "result": result,
                      "audit_receipt": receipt}, indent=2))
    return 0
