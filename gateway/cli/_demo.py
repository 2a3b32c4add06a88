"""`gateway demo init|call`: the demo set-up `make run` performs, and a client to try it."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli._client import add_client_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` verb group."""
    parser = subparsers.add_parser("demo", help="demo set-up and a demo client")
    verbs = parser.add_subparsers(dest="demo_command", metavar="VERB", required=True)

    init = verbs.add_parser(
        "init", help="create what is missing: dev PKI, signed demo models, audit log keys")
    init.add_argument("--config", metavar="FILE", help="gateway TOML configuration file")
    init.add_argument("--force", action="store_true", help="recreate everything")
    init.set_defaults(func=_init)

    call = verbs.add_parser("call", help="call the gateway as a demo identity with an "
                            "example input (a thin case of `gateway call`)")
    call.add_argument("--model", dest="model_option", default="demo-mlp",
                      help="model name (default demo-mlp)")
    call.add_argument("--certs", type=Path, default=None,
                      help="demo PKI directory holding ca.pem and clients/<name>.pem|.key "
                      "(default: from --config, else certs/dev)")
    call.add_argument("--action", choices=("infer", "metadata", "ready"), default="infer",
                      help="the RPC: ModelInfer (default), ModelMetadata or ModelReady")
    call.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    add_client_arguments(call, default_as="scorer")
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
    """`gateway call MODEL --example` under the demo's defaults."""
    from gateway.cli._call import call

    if args.certs is not None and args.ca is None:
        args.ca = args.certs / "ca.pem"
    args.model, args.version, args.inputs, args.inputs_file = args.model_option, "", [], None
    args.example = True
    return call(args)
