"""`gateway audit ...` verbs: keys, checkpoints, entries, proofs, verification and export.

    gateway audit keygen                      write the log keys, print the verifier key
    gateway audit vkey                        print the verifier key (name+keyid+base64)
    gateway audit checkpoint [--size N]       a signed checkpoint, byte for byte (default latest)
    gateway audit entry I                     record I's canonical bytes (the Merkle leaf)
    gateway audit entries --from I --to J     records [I, J), one a line (--json: with hashes)
    gateway audit prove I [--size N]          c2sp.org/tlog-proof@v1 inclusion proof
    gateway audit prove-consistency M N       consistency proof between two signed sizes
    gateway audit verify [LOG_DIR]            check the whole log (--vkey, --witness, --since)
    gateway audit verify-proof PROOF --entry FILE | --leaf-hash H
    gateway audit verify-consistency OLD NEW PROOF
    gateway audit export DIR                  backup up to the latest checkpoint

All read the log directory of ``--config FILE`` (default: the demo config) or ``--dir DIR``,
whether the gateway is running or not; ``checkpoint``, ``entry``, ``entries``, ``prove``,
``prove-consistency``, ``verify`` and ``export`` read the log in PostgreSQL instead with
``--dsn DSN``, or when the config's ``[audit] backend`` is postgresql (``verify`` and
``export`` write it out as a log directory first, so it is checked by the same code).
Reading and checking go through the auditor's API, :mod:`gateway.audit.offline`; keys and
export through :mod:`gateway.audit`.

Exit statuses: 0 success; 1 something checked does not hold (a proof, a signature, damage in
the log); 2 a usage or input error; 3 (``verify`` only) no damage, but the newest records are
not covered by a signed checkpoint yet.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    # The auditor's API is imported by each handler, not here: `gateway --help` and the
    # other verb groups build this parser without loading the audit package.
    from gateway.audit import AuditSettings, PgLogReader, offline

#: A verb's handler: the parsed arguments in, the exit code out.
Handler = Callable[[argparse.Namespace], int]


class AuditToolError(GatewayError):
    """An audit verb cannot be met (no such record, size or checkpoint; unreadable input)."""


def _tool(func: Handler) -> Handler:
    """Run a verb: a failed check exits 1 with its message, an unmet request exits 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from gateway.audit import offline
        try:
            return func(args)
        except offline.VerificationError as err:
            print(f"gateway: FAILED: {err}", file=sys.stderr)
            return 1
        except offline.Error as err:
            raise AuditToolError(str(err)) from None

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `audit` verb group."""
    parser = subparsers.add_parser("audit", help="tamper-evident audit log: proofs, verify")
    verbs = parser.add_subparsers(dest="audit_verb", metavar="VERB", required=True)

    def verb(name: str, func: Handler, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument("--config", type=Path, help="gateway config file (default: demo config)")
        p.add_argument("--dir", type=Path, help="log directory (overrides the config)")
        if name in _PG_VERBS:
            p.add_argument("--dsn", help="read the log in PostgreSQL at this DSN (default: "
                           "the config's [audit] dsn when its backend is postgresql)")
        p.set_defaults(func=_tool(func))
        return p

    def vkey_option(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--vkey", help=f"the log's verifier key, or a file holding it (default: "
                       f"{default})")

    p = verb("keygen", _keygen, "write the log signing and payload keys; print the verifier key")
    p.add_argument("--name", help="log name (checkpoint origin); default from the config")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    verb("vkey", _vkey, "print the log's verifier key (name+keyid+base64)")
    p = verb("checkpoint", _checkpoint, "print a signed checkpoint, byte for byte")
    p.add_argument("--size", type=_index, help="the checkpoint of exactly this size "
                   "(default: the latest)")
    p = verb("entry", _entry, "write record I's canonical bytes (the Merkle leaf) to stdout")
    p.add_argument("index", type=_index)
    p = verb("entries", _entries, "write records [I, J) to stdout, one a line")
    p.add_argument("--from", dest="start", type=_index, default=0, help="first index (0)")
    p.add_argument("--to", dest="end", type=_index,
                   help="end index, exclusive (default: after the last complete record)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line: index, leaf_hash (hex), record")
    p = verb("prove", _prove, "print a c2sp.org/tlog-proof@v1 inclusion proof for record I")
    p.add_argument("index", type=_index)
    p.add_argument("--size", type=_index, help="tree size of a signed checkpoint (default latest)")
    p = verb("prove-consistency", _prove_consistency,
             "print the consistency proof from signed size M to signed size N")
    p.add_argument("first", type=_index)
    p.add_argument("second", type=_index)
    p = verb("verify", _verify, "verify every record, link, root, checkpoint and signature")
    p.add_argument("log_dir", nargs="?", type=Path, help="log directory or export "
                   "(default: from config)")
    vkey_option(p, "an export's own log.vkey, else the key beside the configured signing key")
    p.add_argument("--since", type=Path, help="archived signed checkpoint the log must extend")
    p.add_argument("--witness", type=Path, help="the gateway's witness copy of its latest "
                   "checkpoint (kept outside the log directory): the log must extend it")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--jobs", type=_index, help="worker processes (default: one per CPU)")
    p.add_argument("--allow-unsigned-tail", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = verb("verify-proof", _verify_proof,
             "check a tlog-proof against its checkpoint and the log key, without the log")
    p.add_argument("proof", type=Path, help="c2sp.org/tlog-proof@v1 file ('-' for stdin)")
    vkey_option(p, "the key beside the configured signing key")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--entry", type=Path, help="file with the record's canonical bytes")
    group.add_argument("--leaf-hash", help="the record's leaf hash (hex or base64)")
    p = verb("verify-consistency", _verify_consistency,
             "check that checkpoint NEW extends checkpoint OLD, without the log")
    p.add_argument("old", type=Path, help="the older signed checkpoint (a file)")
    p.add_argument("new", type=Path, help="the newer signed checkpoint (a file)")
    p.add_argument("proof", type=Path, help="the proof from `gateway audit prove-consistency`")
    vkey_option(p, "the key beside the configured signing key")
    p = verb("export", _export, "copy the log up to its latest checkpoint to DIR (a backup)")
    p.add_argument("dest", type=Path)


#: The verbs that read a PostgreSQL log as well as a directory (``--dsn``).
_PG_VERBS = frozenset({"checkpoint", "entry", "entries", "prove", "prove-consistency",
                       "verify", "export"})


def _pg_dsn(args: argparse.Namespace) -> str | None:
    """The DSN of the log to read: ``--dsn``, else the config's when its backend is
    postgresql and no directory was named; None for a log directory."""
    if getattr(args, "dsn", None):
        return str(args.dsn)
    if getattr(args, "log_dir", None) is not None or args.dir is not None:
        return None
    settings = _configured(args)
    if settings.backend != "postgresql":
        return None
    from gateway.db import resolve_dsn

    return resolve_dsn(settings.dsn)


def _pg_reader(args: argparse.Namespace) -> PgLogReader | None:
    dsn = _pg_dsn(args)
    if dsn is None:
        return None
    from gateway.audit import pg_log_reader

    return pg_log_reader(dsn)


def _reader(args: argparse.Namespace) -> offline.LogReader:
    """The log to read: in PostgreSQL (``--dsn`` or the config), else a directory."""
    from gateway.audit import offline
    return _pg_reader(args) or offline.LogReader(_log_dir(args))


def _index(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _configured(args: argparse.Namespace) -> AuditSettings:
    """The ``[audit]`` section of ``--config`` (or the demo defaults): the only one these
    verbs read, so they load only the audit package (load_section)."""
    from gateway.audit import AuditSettings
    from gateway.config import load_section

    return load_section(args.config, "audit", AuditSettings)


def _settings(args: argparse.Namespace) -> AuditSettings:
    settings = _configured(args)
    directory = getattr(args, "log_dir", None) or args.dir
    if directory is not None:
        settings = dataclasses.replace(settings, directory=directory.resolve())
    return settings


def _log_dir(args: argparse.Namespace) -> Path:
    return _settings(args).directory


def _load_vkey(value: str | None, settings: AuditSettings) -> tuple[offline.Verifier, str]:
    """The key of --vkey (a key or a file), else the configured one; and where it came from."""
    from gateway.audit import offline, verifier_key_path

    if value is not None and not os.path.exists(value):
        try:
            return offline.parse_verifier(value.strip()), "from --vkey"
        except offline.Error as err:
            raise ConfigError(f"--vkey: {err}") from None
    path = Path(value) if value is not None else verifier_key_path(settings)
    if not path.exists():
        raise ConfigError(f"no --vkey given and no verifier key at {path}")
    return offline.load_verifier(path), f"from {path}"


def _read(path: Path, what: str) -> str:
    try:
        return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} {path}: {err}") from None


def _out(data: str | bytes) -> None:
    sys.stdout.buffer.write(data.encode() if isinstance(data, str) else data)
    sys.stdout.buffer.flush()


def _keygen(args: argparse.Namespace) -> int:
    from gateway.audit import generate_keys, verifier_key_path

    s = _settings(args)
    vkey = generate_keys(s, args.name, force=args.force)
    print(f"wrote {s.signing_key} and {s.payload_key} (mode 0600), {verifier_key_path(s)}",
          file=sys.stderr)
    _out(vkey + "\n")
    return 0


def _vkey(args: argparse.Namespace) -> int:
    from gateway.audit import signer_vkey

    _out(signer_vkey(_settings(args)) + "\n")
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    _out(_reader(args).checkpoint(args.size))
    return 0


def _entry(args: argparse.Namespace) -> int:
    _out(_reader(args).entry(args.index))
    return 0


def _entries(args: argparse.Namespace) -> int:
    from gateway.audit import offline
    records = _reader(args).records(args.start, args.end)
    if args.json:
        for i, r in enumerate(records, start=args.start):
            line = {"index": i, "leaf_hash": offline.leaf_hash(r).hex(),
                    "record": json.loads(r)}
            _out(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    else:
        _out(b"".join(r + b"\n" for r in records))
    return 0


def _prove(args: argparse.Namespace) -> int:
    from gateway.audit import offline
    _out(offline.prove_inclusion(_reader(args), args.index, args.size))
    return 0


def _prove_consistency(args: argparse.Namespace) -> int:
    from gateway.audit import offline
    _out(offline.prove_consistency(_reader(args), args.first, args.second))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from gateway.audit import offline
    reader = _pg_reader(args)
    if reader is None:
        return _verify_dir(args, _settings(args))
    from gateway.audit import verifier_key_path

    # The log in PostgreSQL, every record (unsigned ones too), as a log directory verified
    # by the same code as any other; the key: --vkey, else the configured one, else the
    # key the log's head row names (the summary says which).
    settings = _settings(args)
    with reader, reader.snapshot() as tmp:
        directory = Path(tmp) / "log"
        if args.vkey is None and verifier_key_path(settings).exists():
            (directory / offline.EXPORT_VKEY).write_bytes(
                verifier_key_path(settings).read_bytes())
            args.vkey = str(verifier_key_path(settings))
        if args.witness is None and settings.backend == "postgresql" and \
                settings.witness_path().exists():
            args.witness = settings.witness_path()
            print(f"gateway: checking freshness against the witness copy {args.witness}",
                  file=sys.stderr)
        args.log_dir = directory
        return _verify_dir(args, dataclasses.replace(settings, directory=directory),
                           origin=f"{reader.directory}")


def _verify_dir(args: argparse.Namespace, settings: AuditSettings, *,
                origin: str = "") -> int:
    from gateway.audit import offline

    directory = settings.directory
    if args.vkey is None and (directory / offline.EXPORT_VKEY).exists():
        verifier, source = None, ""  # an export: its own key, named in the report
    else:
        verifier, source = _load_vkey(args.vkey, settings)
    if args.allow_unsigned_tail:
        print("gateway: --allow-unsigned-tail is gone and changes nothing: records after the "
              "last signed checkpoint are reported as not covered, exit status 3",
              file=sys.stderr)
    since = _read(args.since, "--since") if args.since is not None else None
    witness_file = args.witness
    default = getattr(settings, "witness_path", None)  # the gateway's own witness copy
    if witness_file is None and default is not None and args.log_dir is None and \
            args.dir is None and default().exists():
        witness_file = default()  # the configured log: check it against its own witness
        print(f"gateway: checking freshness against the witness copy {witness_file}",
              file=sys.stderr)
    witness = _read(witness_file, "--witness") if witness_file is not None else None
    total = None
    try:
        total = offline.checkpoint_size(offline.LogReader(directory).checkpoint())
    except offline.Error:
        pass
    with _progress(total, quiet=args.quiet) as update:
        report = offline.verify_log(directory, verifier, since=since, witness=witness,
                                    jobs=args.jobs, key_source=source, progress=update)
    if args.json:
        _out(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        summary = report.summary()
        if origin:
            summary = summary.replace(str(directory), f"{origin} (as exported)")
        _out(summary + "\n")
    return report.status


@contextlib.contextmanager
def _progress(total: int | None, *, quiet: bool) -> Iterator[Callable[[int], object] | None]:
    """A progress bar of records verified on stderr, or none with --quiet (then tqdm is
    not imported: scripts and tests run this verb many times)."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="rec", unit_scale=True, file=sys.stderr, desc="verify") as bar:
        yield bar.update


def _verify_proof(args: argparse.Namespace) -> int:
    from gateway.audit import offline
    verifier, _ = _load_vkey(args.vkey, _settings(args))
    text = _read(args.proof, "proof")
    try:
        entry = args.entry.read_bytes() if args.entry else None
    except OSError as err:
        raise ConfigError(f"cannot read --entry: {err}") from None
    leaf = None
    if args.leaf_hash:
        try:
            leaf = (bytes.fromhex(args.leaf_hash) if len(args.leaf_hash) == 64
                    else base64.b64decode(args.leaf_hash, validate=True))
        except ValueError:
            raise ConfigError("--leaf-hash is neither 64 hex digits nor base64") from None
    index, cp = offline.verify_inclusion(text, verifier, entry=entry, leaf=leaf)
    _out(f"OK: record {index} is in {cp.origin} at size {cp.size} "
         f"(root {cp.root.hex()})\n")
    return 0


def _verify_consistency(args: argparse.Namespace) -> int:
    from gateway.audit import offline
    verifier, _ = _load_vkey(args.vkey, _settings(args))
    old, new = offline.verify_consistency(_read(args.old, "checkpoint"),
                                          _read(args.new, "checkpoint"),
                                          _read(args.proof, "proof"), verifier)
    _out(f"OK: the checkpoint of size {new.size} (root {new.root.hex()}) extends the one of "
         f"size {old.size} (root {old.root.hex()}) in {old.origin}\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gateway.audit import export_log, offline

    settings = _settings(args)
    dsn = _pg_dsn(args)
    if dsn is not None:
        settings = dataclasses.replace(settings, backend="postgresql", dsn=dsn)
    size = export_log(settings, args.dest)
    print(f"exported {size} records (up to the latest signed checkpoint) and the verifier key "
          f"({offline.EXPORT_VKEY}) to {args.dest}", file=sys.stderr)
    return 0
