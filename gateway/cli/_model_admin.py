"""`gateway model keygen|load|unload|list`: signing keys, and the models a gateway serves.

    gateway model keygen keys/release.key        # ECDSA P-256; keys/release.pub beside it
    gateway model list --as admin [--json]       # every version and its state
    gateway model load demo-mlp 1 --as admin     # verify, scan and serve a version on disk
    gateway model unload demo-mlp 1 --as admin

Load, unload and list are admin RPCs over mTLS (actions model.load, model.unload, and
metadata on @gateway for list). Exit codes: 0 done; 1 denied, or the version was refused
(unsigned, tampered, scanner finding); 2 unreachable gateway or bad arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli._client import call_once, client_verb
from gateway.cli._output import FAILED, OK, emit_json
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from gateway._proto.gateway.v1 import admin_pb2


def register(verbs: argparse._SubParsersAction) -> None:
    """Add keygen, load, unload and list under `model`."""
    p = verbs.add_parser("keygen", help="create an ECDSA P-256 model signing key (PEM, mode "
                         "0600) and its public key beside it (.pub)")
    p.add_argument("key", type=Path, help="private key file to create, e.g. keys/release.key")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.set_defaults(func=_keygen)

    for verb, helptext, func in (
            ("load", "load (or reload) a version from the gateway's model repository; verified "
             "and scanned first (model.load)", _load),
            ("unload", "stop serving a version (model.unload)", _unload)):
        p = client_verb(verbs, verb, helptext, func, default_as="admin")
        p.add_argument("name", help="model name")
        p.add_argument("version", help="model version (a directory under the model's folder)")
    client_verb(verbs, "list", "the model versions a gateway knows and their state (needs "
                "metadata on @gateway)", _list, default_as="admin")


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway._atomic import write_atomic

    private, public = args.key, args.key.with_suffix(".pub")
    if private.exists() and not args.force:
        raise ConfigError(f"{private} exists; pass --force to replace it (models signed with "
                          "it will no longer verify against the new public key)")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    write_atomic(private, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), mode=0o600)
    write_atomic(public, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
    print(f"private key {private} (keep secret), public key {public}")
    return OK


def _status(model: admin_pb2.ModelStatus) -> dict[str, str]:
    return {"name": model.name, "version": model.version, "state": model.state,
            "reason": model.reason, "digest": model.digest}


def _call(args: argparse.Namespace, method: str, request: Message, timeout: float = 60) -> Any:
    from gateway._proto.gateway.v1 import admin_pb2_grpc

    return call_once(args, admin_pb2_grpc.ModelAdminStub, method, request, timeout=timeout)


def _print_status(status: dict[str, str]) -> None:
    reason = f"  ({status['reason']})" if status["reason"] else ""
    digest = f"  sha256:{status['digest'][:16]}" if status["digest"] else ""
    print(f"{status['name']} {status['version']}: {status['state']}{digest}{reason}")


def _load(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    reply = _call(args, "LoadModel", admin_pb2.LoadModelRequest(name=args.name,
                                                                version=args.version), 300)
    return _report(args, _status(reply), ok_state="LOADED")


def _unload(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    reply = _call(args, "UnloadModel", admin_pb2.UnloadModelRequest(name=args.name,
                                                                    version=args.version))
    return _report(args, _status(reply), ok_state="UNLOADED")


def _report(args: argparse.Namespace, status: dict[str, str], *, ok_state: str) -> int:
    if args.json:
        emit_json(status)
    else:
        _print_status(status)
    return OK if status["state"] == ok_state else FAILED


def _list(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    reply = _call(args, "ListModels", admin_pb2.ListModelsRequest())
    models = [_status(m) for m in reply.models]
    if args.json:
        emit_json({"models": models})
        return OK
    if not models:
        print("(no models)")
    for status in models:
        _print_status(status)
    return OK
