"""Verify the gateway's audit log without the gateway: the auditor's API.

    from gateway.audit import offline

    key = offline.load_verifier("log.vkey")                  # name+keyid+base64, from the operator
    report = offline.verify_log("/backup/audit-2026-12-01", key, witness=witness_note)
    print(report.summary())                                  # report.status: 0, 1 or 3

    index, cp = offline.verify_inclusion(proof_text, key, entry=record_bytes)
    old, new = offline.verify_consistency(old_note, new_note, proof_text, key)

This module and everything it uses import only the Python standard library and
``cryptography`` (and ``orjson`` if it is installed, for speed; the verdicts are the same
without it): no gRPC, no ONNX Runtime, no NumPy, nothing of the gateway's serving code. It
covers the whole format: records (RFC 8785 canonical JSON, :func:`parse_record`), the hash
chain, the RFC 6962 tree (:func:`leaf_hash`, :func:`node_hash`: the one implementation the
gateway itself uses), C2SP signed checkpoints (Ed25519 signed notes), inclusion proofs
(c2sp.org/tlog-proof, as ``gateway audit prove`` and the receipts give them), consistency
proofs between two checkpoints, and reading a log directory or an export. ``gateway audit``'s
read and verify verbs are built on it. The API defined here is stable; the ``_``-modules
behind it are not.

Exit statuses of a whole-log check (:attr:`Report.status`): 0 every record is covered by a
verified signature and nothing is wrong; 1 damage (each finding names its kind and the first
record it concerns); 3 nothing is wrong, but the newest records are not covered by a signed
checkpoint yet. Freshness (a rollback of the whole directory to an older copy) can only be
checked against a checkpoint kept elsewhere: pass ``witness`` or ``since``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.audit import _canonical
from gateway.audit._merkle import EMPTY_ROOT, ProofError, leaf_hash, node_hash
from gateway.audit._merkle import verify_consistency as _verify_consistency
from gateway.audit._merkle import verify_inclusion as _verify_inclusion
from gateway.audit._note import Checkpoint, Note, NoteError, Verifier, parse_vkey
from gateway.audit._note import open_checkpoint as _open_checkpoint
from gateway.audit._note import open_note as _open_note
from gateway.audit._proof import (
    Error,
    LogReader,
    VerificationError,
    checkpoint_root,
    checkpoint_size,
    format_consistency,
    format_proof,
    parse_consistency,
    parse_proof,
    verify_consistency_proof,
    verify_proof,
)
from gateway.audit._verify import (
    DAMAGED,
    GENESIS_PREV,
    NOT_COVERED,
    OK,
    SCHEMA_VERSION,
    Finding,
    Report,
)
from gateway.audit._verify import verify_log as _verify_log

__all__ = [
    "DAMAGED", "EMPTY_ROOT", "EXPORT_VKEY", "GENESIS_PREV", "NOT_COVERED", "OK", "SCHEMA_VERSION",
    "Checkpoint", "Error", "Finding", "LogReader", "Note", "Report", "VerificationError",
    "Verifier", "checkpoint_size", "format_consistency", "format_proof", "leaf_hash",
    "load_verifier", "node_hash", "open_checkpoint", "open_note", "parse_consistency",
    "parse_proof", "parse_record", "parse_verifier", "prove_consistency", "prove_inclusion",
    "read_entries", "verify_consistency", "verify_consistency_path", "verify_inclusion",
    "verify_inclusion_path", "verify_log",
]

#: The file an export carries its verifier key in (``gateway audit export``).
EXPORT_VKEY = "log.vkey"


def parse_verifier(vkey: str) -> Verifier:
    """A verifier key ``<name>+<key id hex>+<base64 key>`` (the log's name is the origin)."""
    try:
        return parse_vkey(vkey)
    except NoteError as err:
        raise Error(f"verifier key: {err}") from None


def load_verifier(path: str | Path) -> Verifier:
    """The verifier key in a file (``log.vkey``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise Error(f"cannot read verifier key {path}: {err}") from None
    return parse_verifier(text.strip())


def parse_record(data: bytes) -> dict:
    """A record's fields, if ``data`` is exactly its RFC 8785 canonical encoding."""
    try:
        record = _canonical.decode_canonical(data)
    except _canonical.EncodingError as err:
        raise VerificationError(f"record: {err}") from None
    if record.get("v") != SCHEMA_VERSION:
        raise VerificationError(f"record: schema version {record.get('v')!r}, expected "
                                f"{SCHEMA_VERSION}")
    return record


def open_checkpoint(note: str | bytes, key: Verifier, origin: str | None = None,
                    cosigners: Sequence[Verifier] = ()) -> Checkpoint:
    """A C2SP checkpoint signed by ``key`` for ``origin`` (the gateway's logs: the key's name),
    or :class:`VerificationError`. Signatures by ``cosigners`` (witnesses) must verify too."""
    try:
        cp, _ = _open_checkpoint(note, key, key.name if origin is None else origin,
                                 list(cosigners))
    except NoteError as err:
        raise VerificationError(f"checkpoint: {err}") from None
    return cp


def open_note(note: str | bytes, keys: Sequence[Verifier]) -> Note:
    """A C2SP signed note's text and which of ``keys`` signed it (at least one must)."""
    try:
        return _open_note(note, list(keys))
    except NoteError as err:
        raise VerificationError(f"signed note: {err}") from None


def verify_inclusion_path(index: int, size: int, leaf: bytes, path: Sequence[bytes],
                          root: bytes) -> None:
    """RFC 9162 2.1.3.2: raise :class:`VerificationError` unless ``path`` proves ``leaf``."""
    try:
        _verify_inclusion(index, size, leaf, path, root)
    except ProofError as err:
        raise VerificationError(str(err)) from None


def verify_consistency_path(size1: int, size2: int, root1: bytes, root2: bytes,
                            path: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2: raise :class:`VerificationError` unless size2 extends size1."""
    try:
        _verify_consistency(size1, size2, root1, root2, path)
    except ProofError as err:
        raise VerificationError(str(err)) from None


def verify_log(directory: str | Path, key: Verifier | None = None, *, since: str | None = None,
               witness: str | None = None, jobs: int | None = None, key_source: str = "given",
               progress: Callable[[int], object] | None = None) -> Report:
    """Check a whole log directory or export; ``key`` defaults to an export's own ``log.vkey``.

    ``since`` / ``witness``: signed checkpoint notes kept outside the log that it must extend.
    ``key_source`` says in the report where ``key`` came from.
    """
    directory = Path(directory)
    source = key_source
    if key is None:
        if not (directory / EXPORT_VKEY).exists():
            raise Error(f"no verifier key given and {directory / EXPORT_VKEY} does not exist")
        key, source = load_verifier(directory / EXPORT_VKEY), f"from {directory / EXPORT_VKEY}"
    return _verify_log(directory, key, since=since, witness=witness, jobs=jobs,
                       key_source=source, progress=progress)


def verify_inclusion(proof: str, key: Verifier, *, entry: bytes | None = None,
                     leaf: bytes | None = None) -> tuple[int, Checkpoint]:
    """Check a c2sp.org/tlog-proof for a record (its canonical bytes, or its leaf hash)."""
    return verify_proof(proof, key, entry=entry, leaf=leaf)


def verify_consistency(old_note: str | bytes, new_note: str | bytes, proof: str,
                       key: Verifier) -> tuple[Checkpoint, Checkpoint]:
    """Check that the log signed in ``new_note`` is an extension of the one in ``old_note``."""
    return verify_consistency_proof(old_note, new_note, proof, key)


def read_entries(directory: str | Path, start: int = 0, end: int | None = None) -> list[bytes]:
    """The canonical bytes of records ``[start, end)`` (complete records only)."""
    return LogReader(Path(directory)).records(start, end)


def _reader(log: str | Path | LogReader) -> LogReader:
    return log if isinstance(log, LogReader) else LogReader(Path(log))


def prove_inclusion(directory: str | Path | LogReader, index: int,
                    size: int | None = None) -> str:
    """A tlog-proof that record ``index`` is in the signed checkpoint of ``size`` (latest).
    ``directory`` is a log directory or export, or a reader of another store of the log."""
    reader = _reader(directory)
    if size is None:
        size = checkpoint_size(reader.checkpoint())
    if not 0 <= index < size:
        raise Error(f"record {index} is not covered by the checkpoint of size {size}")
    tree, note = reader.proving_tree(size)
    return format_proof(index, tree.inclusion_proof(index, size), note)


def prove_consistency(directory: str | Path | LogReader, first: int, second: int) -> str:
    """A consistency proof between two sizes that signed checkpoints of the log name."""
    reader = _reader(directory)
    if not 0 < first <= second:
        raise Error(f"need 0 < old size <= new size, got {first} and {second}")
    reader.checkpoint(first)  # refuse a size no checkpoint signs
    tree, _note = reader.proving_tree(second)
    if tree.root(first) != checkpoint_root(reader.checkpoint(first)):
        raise VerificationError(f"records 0..{first - 1} no longer give the root the "
                                f"checkpoint of size {first} signs: run `gateway audit verify`")
    return format_consistency(first, second, tree.consistency_proof(first, second))
