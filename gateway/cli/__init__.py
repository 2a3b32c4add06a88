"""The ``gateway`` command: one module per verb group, each beside its tests.

    gateway serve [--config FILE]          run the gateway
    gateway demo init                      demo PKI, signed demo models, audit key
    gateway certs init                     development PKI only
    gateway policy check|test|explain|diff|fmt|reload|show|shadow|shadow-report
    gateway call MODEL --input NAME=VALUES     call any model over mTLS; prints the receipt
    gateway audit keygen|vkey|checkpoint|entry|entries|prove|prove-consistency|verify|
                  verify-proof|verify-consistency|export
    gateway model sign|verify|encrypt|decrypt|rewrap|scan|test|profile|keygen|load|unload|list
    gateway monitor                        live terminal summary

Each verb module exposes ``register(subparsers)``, which only adds arguments: what a verb
needs (grpc, ONNX Runtime, numpy, the audit log) is imported by its handler, so building the
parser, ``--help`` and the offline verbs do not pay for the others'. Its handler returns the
exit code:
0 success, 1 a check failed or a request was denied, 2 bad usage or an error (one line on
stderr, never a traceback unless --verbose). Results go to stdout, diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.cli._output import silence_stdout
from gateway.errors import ConfigError, GatewayError

# Verb-group modules, in the order `gateway --help` lists them.
_VERBS = ("_serve", "_demo", "_call", "_certs", "_policy", "_audit", "_model", "_monitor")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and shell completion)."""
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Policy-as-code access-control gateway for ML inference.",
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _VERBS:
        importlib.import_module(f"gateway.cli.{name}").register(subparsers)
    # `audit checkpoint --live` (the verb is defined in _audit; the live fetch in _audit_live).
    from gateway.cli._audit_live import attach

    audit = subparsers.choices["audit"]
    verbs = next(action for action in audit._actions
                 if isinstance(action, argparse._SubParsersAction))
    attach(verbs.choices["checkpoint"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except GatewayError as err:
        if args.verbose:
            raise
        print(f"gateway: error: {err.diagnostics()}", file=sys.stderr)
        note = _path_note(args, err)
        if note:
            print(note, file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except BrokenPipeError:
        # `gateway ... | head`: the reader left; stop quietly, as Unix tools do.
        silence_stdout()
        return 141
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        # A refused gRPC call; grpc is loaded only by the verbs that talk to a server, and
        # an RpcError can only come from one of them.
        grpc = sys.modules.get("grpc")
        if grpc is None or not isinstance(err, grpc.RpcError) or args.verbose:
            raise
        from gateway.cli._client import RpcFailed

        failed = RpcFailed(err)
        print(f"gateway: error: {failed.diagnostics()}", file=sys.stderr)
        return failed.exit_code
    return int(code or 0)


def _path_note(args: argparse.Namespace, err: GatewayError) -> str:
    """How relative paths resolved, for a configuration error that names a path: the fix
    (e.g. creating a missing key) must write to the same place, with the same --config."""
    # A PolicyError (a ConfigError too) names policy files, not config paths; one can only
    # have been raised if its package was loaded.
    policy = sys.modules.get("gateway.policy")
    is_policy = policy is not None and isinstance(err, policy.PolicyError)
    text = str(err)
    if (not isinstance(err, ConfigError) or is_policy or "/" not in text
            or "resolve" in text or not hasattr(args, "config")):
        return ""
    config = getattr(args, "config", None)
    if config is None:
        return (f"note: without --config, the demo defaults' paths resolve against the working "
                f"directory ({Path.cwd()}); run from the repository or pass --config FILE")
    source = Path(config).resolve()
    return (f"note: relative paths in {config} resolve against its directory ({source.parent});"
            f" commands that create what is missing (`gateway audit keygen`, `gateway demo "
            f"init`) need the same --config {config}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
