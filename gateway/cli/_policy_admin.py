"""`gateway policy reload|show`: the live policy of a running gateway, over mTLS.

    gateway policy show --as auditor [--json]        # digest and files (policy.read)
    gateway policy reload --as admin                 # re-read and install (policy.load)

Exit codes: 0 done; 1 the reload was rejected (the old policy stays live) or the caller was
denied; 2 the gateway could not be reached or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import sys

from gateway.cli._client import add_client_arguments, connect
from gateway.cli._output import FAILED, OK, emit_json


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the live-gateway verbs under `policy`."""
    p = verbs.add_parser("show", help="the live policy's digest and files (action "
                         "policy.read on @gateway)")
    add_client_arguments(p, default_as="auditor")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=_show)

    p = verbs.add_parser("reload", help="make the gateway re-read its policy directory; "
                         "installed only if it compiles and its cases pass (policy.load)")
    add_client_arguments(p, default_as="admin")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=_reload)


def _stub(args: argparse.Namespace):
    from gateway._proto.gateway.v1 import admin_pb2_grpc

    channel, _ = connect(args)
    return channel, admin_pb2_grpc.PolicyAdminStub(channel)


def _show(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    channel, stub = _stub(args)
    with channel:
        reply = stub.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=30)
    if args.json:
        emit_json({"digest": reply.digest, "model.conf": reply.model_conf,
                   "policy.csv": reply.policy_csv})
        return OK
    print(f"# live policy digest {reply.digest}")
    print("# --- model.conf")
    sys.stdout.write(reply.model_conf)
    print("# --- policy.csv")
    sys.stdout.write(reply.policy_csv)
    return OK


def _reload(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    channel, stub = _stub(args)
    with channel:
        reply = stub.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=120)
    if args.json:
        emit_json({"accepted": reply.accepted, "old_digest": reply.old_digest,
                   "new_digest": reply.new_digest, "error": reply.error})
    elif reply.accepted:
        same = " (unchanged)" if reply.old_digest == reply.new_digest else ""
        print(f"policy {reply.new_digest} installed{same}; was {reply.old_digest}")
    else:
        print(f"policy reload rejected; {reply.old_digest} stays live:\n{reply.error}",
              file=sys.stderr)
    return OK if reply.accepted else FAILED
