"""`gateway audit ...` verbs: keys, checkpoints, entries, proofs, verification and export.

    gateway audit keygen                      write the log keys, print the verifier key
    gateway audit vkey                        print the verifier key (name+keyid+base64)
    gateway audit checkpoint                  latest signed checkpoint, byte for byte
    gateway audit entry I                     record I's canonical bytes (the Merkle leaf)
    gateway audit prove I [--size N]          c2sp.org/tlog-proof@v1 inclusion proof
    gateway audit prove-consistency M N       consistency proof, one base64 hash a line
    gateway audit verify [LOG_DIR] --vkey K   check the whole log (add --since CP, --json)
    gateway audit verify-proof PROOF --vkey K --entry FILE
    gateway audit export DIR                  backup up to the latest checkpoint

All read the log directory of ``--config FILE`` (default: the demo config) or ``--dir DIR``,
whether the gateway is running or not.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

from gateway.errors import ConfigError, GatewayError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `audit` verb group."""
    parser = subparsers.add_parser("audit", help="tamper-evident audit log: proofs, verify")
    verbs = parser.add_subparsers(dest="audit_verb", metavar="VERB", required=True)

    def verb(name: str, func, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument("--config", type=Path, help="gateway config file (default: demo config)")
        p.add_argument("--dir", type=Path, help="log directory (overrides the config)")
        p.set_defaults(func=func)
        return p

    p = verb("keygen", _keygen, "write the log signing and payload keys; print the verifier key")
    p.add_argument("--name", help="log name (checkpoint origin); default from the config")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    verb("vkey", _vkey, "print the log's verifier key (name+keyid+base64)")
    verb("checkpoint", _checkpoint, "print the latest signed checkpoint, byte for byte")
    p = verb("entry", _entry, "write record I's canonical bytes (the Merkle leaf) to stdout")
    p.add_argument("index", type=_index)
    p = verb("prove", _prove, "print a c2sp.org/tlog-proof@v1 inclusion proof for record I")
    p.add_argument("index", type=_index)
    p.add_argument("--size", type=_index, help="tree size of a signed checkpoint (default latest)")
    p = verb("prove-consistency", _prove_consistency,
             "print the consistency proof from size M to size N, one base64 hash a line")
    p.add_argument("first", type=_index)
    p.add_argument("second", type=_index)
    p = verb("verify", _verify, "verify every record, link, root, checkpoint and signature")
    p.add_argument("log_dir", nargs="?", type=Path, help="log directory (default: from config)")
    p.add_argument("--vkey", help="the log's verifier key, or a file holding it "
                   "(default: the key beside the configured signing key)")
    p.add_argument("--since", type=Path, help="archived signed checkpoint the log must extend")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow-unsigned-tail", action="store_true",
                   help="accept records after the last checkpoint (a live log)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = verb("verify-proof", _verify_proof,
             "check a tlog-proof against its checkpoint and the log key, without the log")
    p.add_argument("proof", type=Path, help="c2sp.org/tlog-proof@v1 file ('-' for stdin)")
    p.add_argument("--vkey", help="the log's verifier key, or a file holding it")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--entry", type=Path, help="file with the record's canonical bytes")
    group.add_argument("--leaf-hash", help="the record's leaf hash (hex or base64)")
    p = verb("export", _export, "copy the log up to its latest checkpoint to DIR (a backup)")
    p.add_argument("dest", type=Path)


def _index(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _settings(args: argparse.Namespace):
    import dataclasses

    from gateway.config import load_config

    settings = load_config(args.config).audit
    directory = getattr(args, "log_dir", None) or args.dir
    if directory is not None:
        settings = dataclasses.replace(settings, directory=directory.resolve())
    return settings


def _reader(args: argparse.Namespace):
    from gateway.audit._proof import LogReader

    return LogReader(_settings(args).directory)


def _load_vkey(value: str | None, settings):
    from gateway.audit._keys import vkey_path
    from gateway.audit._note import NoteError, parse_vkey

    if value is None:
        path = vkey_path(settings.signing_key)
        if not path.exists():
            raise ConfigError(f"no --vkey given and no verifier key at {path}")
        value = str(path)
    text = value
    if os.path.exists(value):
        text = Path(value).read_text(encoding="utf-8").strip()
    try:
        return parse_vkey(text)
    except NoteError as err:
        raise ConfigError(f"--vkey: {err}") from None


def _out(data: str | bytes) -> None:
    sys.stdout.buffer.write(data.encode() if isinstance(data, str) else data)
    sys.stdout.buffer.flush()


def _keygen(args: argparse.Namespace) -> int:
    from gateway.audit import _keys

    s = _settings(args)
    signer = _keys.generate(s.signing_key, s.payload_key, args.name or s.name, force=args.force)
    print(f"wrote {s.signing_key} and {s.payload_key} (mode 0600), "
          f"{_keys.vkey_path(s.signing_key)}", file=sys.stderr)
    _out(signer.vkey + "\n")
    return 0


def _vkey(args: argparse.Namespace) -> int:
    from gateway.audit import _keys

    s = _settings(args)
    path = _keys.vkey_path(s.signing_key)
    if path.exists():
        vkey = path.read_text(encoding="utf-8").strip()
    else:
        vkey = _keys.load_signer(s.signing_key).vkey
    _out(vkey + "\n")
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    _out(_reader(args).checkpoint())
    return 0


def _entry(args: argparse.Namespace) -> int:
    _out(_reader(args).entry(args.index))
    return 0


def _prove(args: argparse.Namespace) -> int:
    from gateway.audit._proof import checkpoint_size, format_proof

    reader = _reader(args)
    note = reader.checkpoint(args.size)
    size = checkpoint_size(note)
    if args.index >= size:
        raise _tool_error(f"record {args.index} is not covered by the checkpoint of size {size}")
    proof = reader.tree(size).inclusion_proof(args.index, size)
    _out(format_proof(args.index, proof, note))
    return 0


def _prove_consistency(args: argparse.Namespace) -> int:
    from gateway.audit._merkle import ProofError

    reader = _reader(args)
    if not 0 < args.first <= args.second:
        raise _tool_error("need 0 < M <= N")
    try:
        proof = reader.tree(args.second).consistency_proof(args.first, args.second)
    except ProofError as err:
        raise _tool_error(str(err)) from None
    _out("".join(base64.b64encode(h).decode() + "\n" for h in proof))
    return 0


def _tool_error(msg: str) -> GatewayError:
    from gateway.audit._proof import AuditToolError

    return AuditToolError(msg)


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gateway.audit._proof import checkpoint_size
    from gateway.audit._verify import verify_log

    settings = _settings(args)
    verifier = _load_vkey(args.vkey, settings)
    since = None
    if args.since is not None:
        try:
            since = args.since.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"--since: cannot read {args.since}: {err}") from None
    total = None
    try:
        total = checkpoint_size((settings.directory / "checkpoint").read_text(encoding="utf-8"))
    except (OSError, GatewayError):
        pass
    with tqdm(total=total, unit="rec", unit_scale=True, file=sys.stderr, disable=args.quiet,
              desc="verify") as bar:
        report = verify_log(settings.directory, verifier, since=since,
                            allow_unsigned_tail=args.allow_unsigned_tail, progress=bar.update)
    if args.json:
        _out(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        _out(report.summary() + "\n")
    return 0 if report.ok else 1


def _verify_proof(args: argparse.Namespace) -> int:
    from gateway.audit._proof import verify_proof

    settings = _settings(args)
    verifier = _load_vkey(args.vkey, settings)
    try:
        text = sys.stdin.read() if str(args.proof) == "-" else args.proof.read_text("utf-8")
        entry = args.entry.read_bytes() if args.entry else None
    except OSError as err:
        raise ConfigError(f"cannot read input: {err}") from None
    leaf = None
    if args.leaf_hash:
        try:
            leaf = (bytes.fromhex(args.leaf_hash) if len(args.leaf_hash) == 64
                    else base64.b64decode(args.leaf_hash, validate=True))
        except ValueError:
            raise ConfigError("--leaf-hash is neither 64 hex digits nor base64") from None
    index, cp = verify_proof(text, verifier, entry=entry, leaf_hash=leaf)
    _out(f"OK: record {index} is in {cp.origin} at size {cp.size} "
         f"(root {cp.root.hex()})\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gateway.audit._export import export_log

    settings = _settings(args)
    from gateway.audit._keys import vkey_path

    size = export_log(settings.directory, args.dest, vkey_path(settings.signing_key))
    print(f"exported {size} records (up to the latest signed checkpoint) to {args.dest}",
          file=sys.stderr)
    return 0
