"""`gateway certs init|issue`: the development PKI (ECDSA P-256) for the demo and tests.

    gateway certs init [--dir certs/dev] [--force]
    gateway certs issue NAME --uri spiffe://demo.local/svc/batch [--cn CN] [--days N] [--dir DIR]

Production deployments bring their own PKI and point ``[tls] cert/key/ca`` at it; these
verbs exist so that a fresh checkout can run mutual TLS with no external tooling.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gateway.errors import ConfigError

_DEFAULT_DIR = Path("certs/dev")
# A client name becomes a file name under clients/: no separators, no leading dot.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `certs` verb group."""
    parser = subparsers.add_parser("certs", help="development PKI (CA, server and client certs)")
    verbs = parser.add_subparsers(dest="certs_command", metavar="VERB", required=True)

    init = verbs.add_parser(
        "init", help="write CA, server and demo client certificates (keeps existing ones)")
    init.add_argument("--dir", type=Path, default=_DEFAULT_DIR,
                      help="output directory (default: certs/dev)")
    init.add_argument("--force", action="store_true",
                      help="replace everything, starting a new CA")
    init.set_defaults(func=_init)

    issue = verbs.add_parser("issue", help="issue one more client certificate from the CA")
    issue.add_argument("name", metavar="NAME", help="file stem: writes clients/NAME.pem|.key")
    issue.add_argument("--uri", help="SPIFFE ID for the URI SAN, e.g. spiffe://demo.local/svc/x")
    issue.add_argument("--cn", help="subject common name (alone: a cn:<name> identity)")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue.add_argument("--dir", type=Path, default=_DEFAULT_DIR,
                       help="PKI directory holding ca.pem/ca.key (default: certs/dev)")
    issue.add_argument("--force", action="store_true", help="overwrite an existing NAME")
    issue.set_defaults(func=_issue)


def _init(args: argparse.Namespace) -> int:
    from gateway.identity import pki

    result = pki.init_dev_pki(args.dir, force=args.force)
    for path in result["written"]:
        print(f"wrote {path}  (key: {path.with_suffix('.key')}, mode 0600)")
    for path in result["kept"]:
        print(f"kept  {path}")
    print(f"CA bundle for clients and [tls] ca: {result['ca']}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from gateway.identity import SpiffeIdError, parse_spiffe_id, pki

    if not _NAME_RE.fullmatch(args.name):
        raise ConfigError(f"NAME {args.name!r}: use 1-64 of [A-Za-z0-9._-], "
                          f"starting with a letter or digit")
    if not args.uri and not args.cn:
        raise ConfigError("give --uri (a SPIFFE ID) or --cn (or both)")
    if args.uri:
        try:
            parse_spiffe_id(args.uri)
        except SpiffeIdError as err:
            raise ConfigError(f"--uri: {err}") from None
    if args.days < 1:
        raise ConfigError(f"--days must be at least 1, not {args.days}")
    ca_pem, ca_key = args.dir / "ca.pem", args.dir / "ca.key"
    if not ca_pem.exists() or not ca_key.exists():
        raise ConfigError(f"no CA in {args.dir} (ca.pem and ca.key); "
                          f"run `gateway certs init --dir {args.dir}` first")
    cert_path = args.dir / "clients" / f"{args.name}.pem"
    key_path = cert_path.with_suffix(".key")
    if cert_path.exists() and not args.force:
        raise ConfigError(f"{cert_path} exists; pass --force to replace it")
    ca = pki.load_pair(ca_pem, ca_key)
    client = pki.issue_client(ca, uris=[args.uri] if args.uri else [], cn=args.cn,
                              days=args.days)
    client.write(cert_path, key_path)
    who = args.uri or f"cn:{args.cn}"
    print(f"wrote {cert_path}  (key: {key_path}, mode 0600) for {who}, "
          f"valid {args.days} days")
    if not args.uri:
        print("note: a CN-only certificate is accepted only if [tls] cn_issuers lists "
              f"{ca.cert.subject.rfc4514_string()!r}")
    return 0
