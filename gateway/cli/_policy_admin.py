"""`gateway policy reload|show|shadow|shadow-report`: the live policy of a running gateway.

    gateway policy show --as auditor [--json]        # digest and files (policy.read)
    gateway policy reload --as admin                 # re-read and install (policy.load)
    gateway policy shadow /srv/policies-next --as admin   # decide beside live (policy.load)
    gateway policy shadow --clear --as admin
    gateway policy shadow-report --as auditor        # who would gain or lose what (policy.read)

Exit codes: 0 done; 1 the reload was rejected (the old policy stays live) or the caller was
denied; 2 the gateway could not be reached or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from gateway.cli._client import call_once, client_verb
from gateway.cli._output import FAILED, OK, emit_json

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from gateway._proto.gateway.v1.admin_pb2 import ShadowDisagreement


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the live-gateway verbs under `policy`."""
    client_verb(verbs, "show", "the live policy's digest and files (action policy.read on "
                "@gateway)", _show, default_as="auditor")
    client_verb(verbs, "reload", "make the gateway re-read its policy directory; installed "
                "only if it compiles and its cases pass (policy.load)", _reload,
                default_as="admin")
    p = client_verb(verbs, "shadow", "decide every request also under a candidate policy "
                    "(checked and tested like a reload); answers keep following the live one "
                    "(policy.load)", _shadow, default_as="admin")
    p.add_argument("directory", nargs="?", default="",
                   help="candidate policy directory on the gateway's host (absolute, or "
                   "relative to the gateway's working directory), under its [policy] shadow_root; "
                   "default: its [policy] shadow")
    p.add_argument("--clear", action="store_true", help="stop shadow evaluation")
    p = client_verb(verbs, "shadow-report", "what the shadow policy would change on live "
                    "traffic: who would gain or lose which access (policy.read)",
                    _shadow_report, default_as="auditor")
    p.add_argument("--by-rule", action="store_true",
                   help="group by (live rule, shadow rule) instead of by request")
    p.add_argument("--exit-code", action="store_true",
                   help="exit 1 if the shadow disagrees with the live policy at all")


def _call(args: argparse.Namespace, method: str, request: Message, timeout: float = 60
          ) -> Any:  # the reply of ``method``, as in call_once
    from gateway._proto.gateway.v1 import admin_pb2_grpc

    return call_once(args, admin_pb2_grpc.PolicyAdminStub, method, request, timeout=timeout)


def _show(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    reply = _call(args, "GetPolicy", admin_pb2.GetPolicyRequest())
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

    reply = _call(args, "ReloadPolicy", admin_pb2.ReloadPolicyRequest(), timeout=300)
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


def _shadow(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    reply = _call(args, "SetShadowPolicy", admin_pb2.SetShadowPolicyRequest(
        directory=args.directory, clear=args.clear), timeout=300)
    if args.json:
        emit_json({"active": reply.active, "shadow_digest": reply.shadow_digest,
                   "directory": reply.directory, "live_digest": reply.live_digest,
                   "decisions": reply.decisions, "disagreements": reply.disagreements})
    elif reply.active:
        print(f"shadow policy {reply.shadow_digest} ({reply.directory}) decided beside live "
              f"{reply.live_digest}")
    else:
        print(f"shadow mode off; the last shadow saw {reply.disagreements} disagreement(s) in "
              f"{reply.decisions} decision(s)")
    return OK


def _row(d: ShadowDisagreement) -> dict[str, object]:
    return {"subject": d.subject, "model": d.model, "action": d.action, "change": d.change,
            "live_rule": d.live_rule, "shadow_rule": d.shadow_rule, "count": d.count}


def _shadow_report(args: argparse.Namespace) -> int:
    from gateway._proto.gateway.v1 import admin_pb2

    r = _call(args, "GetShadowReport", admin_pb2.GetShadowReportRequest())
    failed = args.exit_code and r.disagreements > 0
    if args.json:
        emit_json({"active": r.active, "shadow_digest": r.shadow_digest,
                   "live_digest": r.live_digest, "directory": r.directory, "since": r.since,
                   "decisions": r.decisions, "disagreements": r.disagreements,
                   "dropped_requests": r.dropped_requests,
                   "by_rule": [_row(d) for d in r.by_rule],
                   "by_request": [_row(d) for d in r.by_request]})
        return FAILED if failed else OK
    if not r.active:
        print(f"no shadow policy (live {r.live_digest})")
        return OK
    print(f"shadow {r.shadow_digest[:16]} ({r.directory}) beside live {r.live_digest[:16]}: "
          f"{r.disagreements} disagreement(s) in {r.decisions} decision(s)")
    if args.by_rule:
        for d in r.by_rule:
            print(f"{'+' if d.change == 'grant' else '-'} {d.count:>6}  live {d.live_rule} -> "
                  f"shadow {d.shadow_rule}")
    else:
        for d in r.by_request:
            print(f"{'+' if d.change == 'grant' else '-'} {d.subject} {d.action} "
                  f"{d.model or '@gateway'}  x{d.count}  (live {d.live_rule}, shadow "
                  f"{d.shadow_rule})")
    if r.dropped_requests:
        print(f"({r.dropped_requests} disagreement(s) of further requests counted in the "
              "totals only)", file=sys.stderr)
    return FAILED if failed else OK
