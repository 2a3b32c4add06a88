"""`gateway audit checkpoint --live`: the running gateway's latest signed checkpoint, over mTLS.

The offline `audit checkpoint` (in :mod:`._audit`) reads the log directory; with ``--live``
it asks the AuditService instead (action ``audit.read`` on @gateway), so an auditor needs no
access to the gateway's disk. The note is printed byte for byte either way, so it can be
archived and later given to ``gateway audit verify --since``. :func:`attach` adds the flag
to the existing verb without changing how it is defined.
"""

from __future__ import annotations

import argparse
import sys

from gateway.cli._client import add_client_arguments, call_once
from gateway.cli._output import OK


def attach(parser: argparse.ArgumentParser) -> None:
    """Add --live and the connection options to the `audit checkpoint` parser."""
    offline = parser.get_default("func")
    parser.add_argument("--live", action="store_true",
                        help="fetch it from the running gateway (AuditService.GetCheckpoint) "
                        "instead of the log directory")
    add_client_arguments(parser, default_as="auditor", config=False)

    def run(args: argparse.Namespace) -> int:
        return _live(args) if args.live else offline(args)

    parser.set_defaults(func=run)


def _live(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc

    reply = call_once(args, audit_pb2_grpc.AuditServiceStub, "GetCheckpoint",
                      audit_pb2.GetCheckpointRequest(), timeout=30)
    sys.stdout.buffer.write(reply.signed_note)
    return OK
