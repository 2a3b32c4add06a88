"""`gateway model sign|verify`: OMS signatures over a model version directory.

    gateway model sign models/iris/1 --key signer.key [--cert signer.pem --chain ca.pem]
    gateway model verify models/iris/1 --pubkey signer.pub
    gateway model verify models/iris/1 --chain ca.pem [--identity 'release@*']
    gateway model verify models/iris/1 --config gateway.toml      # the gateway's trust policy

Progress bars go to stderr when it is a terminal; ``--json`` prints one JSON object on stdout
(``{"ok": false, "error": ...}`` on failure, exit status 2) for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.errors import GatewayError


def register(verbs: argparse._SubParsersAction) -> None:
    """Add ``sign`` and ``verify`` to the `model` group."""
    sign = verbs.add_parser("sign", help="sign a model directory (writes MODEL_DIR/model.sig)")
    sign.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    sign.add_argument("--key", type=Path, required=True, help="PEM ECDSA private key")
    sign.add_argument("--cert", type=Path, help="signing certificate (PEM) for certificate signing")
    sign.add_argument("--chain", type=Path, action="append", default=[],
                      help="intermediate/CA certificates (PEM) to include; repeatable")
    sign.add_argument("--subject", help="what the signature names, NAME or NAME/VERSION "
                      "(default: NAME/VERSION of a models/<name>/<version> directory); trust "
                      "rules with `bind` require it to match what the model is served as")
    _common(sign)
    sign.set_defaults(func=_sign)

    verify = verbs.add_parser("verify", help="verify MODEL_DIR/model.sig over the directory")
    verify.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    trust = verify.add_mutually_exclusive_group(required=True)
    trust.add_argument("--pubkey", type=Path, help="trust this PEM public key")
    trust.add_argument("--chain", type=Path, action="append",
                       help="trust signing certificates chaining to this CA bundle; repeatable")
    trust.add_argument("--config", type=Path, help="use the [signing] trust policy of this "
                       "gateway configuration")
    verify.add_argument("--identity", action="append",
                        help="with --chain: accepted certificate identity glob; repeatable")
    verify.add_argument("--name", help="model name for the trust policy (default: the parent "
                        "directory's name, as in models/<name>/<version>)")
    verify.add_argument("--version", dest="model_version", help="model version it is served as "
                        "(default: the directory's name)")
    _common(verify)
    verify.set_defaults(func=_verify)


def _common(parser: argparse.ArgumentParser) -> None:
    kek = parser.add_mutually_exclusive_group()
    kek.add_argument("--kek-file", type=Path, help="key-encryption key file for *.enc files")
    kek.add_argument("--kek-env", help="environment variable holding the key-encryption key")
    parser.add_argument("--json", action="store_true", help="print a JSON result for scripts")


def _kek(args: argparse.Namespace) -> bytes | None:
    if args.kek_file is None and not args.kek_env:
        return None
    from gateway.models.encryption import load_kek

    return load_kek(file=args.kek_file, env=args.kek_env or "")


def _progress(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


def run_json(args: argparse.Namespace, action: Callable[[], tuple[dict, str]]) -> int:
    """Run ``action() -> (dict, text)``; print text, or JSON with --json; errors as JSON too."""
    try:
        result, text = action()
    except GatewayError as err:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": str(err), **_rule_of(err)}, sort_keys=True))
        return 2
    if args.json:
        print(json.dumps({"ok": True, **result}, sort_keys=True))
    else:
        print(text)
    return 0


def _rule_of(err: GatewayError) -> dict[str, str]:
    rule = getattr(err, "rule", "")
    return {"rule": rule} if rule else {}


def _sign(args: argparse.Namespace) -> int:
    from gateway.models.signing import SignatureError, sign_model, signed_statement

    def action() -> tuple[dict, str]:
        target = sign_model(args.model_dir, key=args.key, cert=args.cert, chain=args.chain,
                            progress=_progress(args), kek=_kek(args), subject=args.subject)
        try:
            statement = signed_statement(target.read_bytes())
        except SignatureError as err:  # pragma: no cover - we just wrote it
            raise SignatureError(f"{target}: wrote an unreadable signature: {err}") from err
        result = {"signature": str(target), "digest": statement.root,
                  "subject": statement.subject_name, "files": sorted(statement.resources)}
        return result, (f"signed {len(statement.resources)} file(s) of {args.model_dir}: "
                        f"{target} (manifest sha256:{statement.root})")

    return run_json(args, action)


def _verify(args: argparse.Namespace) -> int:
    from gateway.models.signing import SigningSettings, TrustRule, verify_model

    def action() -> tuple[dict, str]:
        if args.identity and not args.chain:
            raise GatewayError("--identity applies only with --chain")
        if args.config is not None:
            from gateway.config import load_config

            settings = load_config(args.config).signing
        elif args.pubkey is not None:
            settings = SigningSettings(trust=(TrustRule(name="--pubkey", pubkey=args.pubkey),))
        else:
            identities = tuple(args.identity or ("*",))
            settings = SigningSettings(trust=tuple(
                TrustRule(name=f"--chain {path}", ca=path, identities=identities)
                for path in args.chain))
        verified = verify_model(args.model_dir, settings, model_name=args.name,
                                version=args.model_version, kek=_kek(args),
                                progress=_progress(args))
        result = {"model_dir": str(args.model_dir), "digest": verified.digest,
                  "signer": verified.signer, "rule": verified.rule,
                  "files": list(verified.files)}
        return result, (f"verified {len(verified.files)} file(s) of {args.model_dir}: signed by "
                        f"{verified.signer} (rule {verified.rule}), manifest "
                        f"sha256:{verified.digest}")

    return run_json(args, action)
