"""Reading a log directory without the writer, and the c2sp.org/tlog-proof@v1 bundle.

The CLI uses :class:`LogReader` while the gateway may be appending: it reads only complete
records, and proofs are always for a size some signed checkpoint covers.

A tlog-proof (c2sp.org/tlog-proof) is::

    c2sp.org/tlog-proof@v1
    [extra <base64>]
    index <I>
    <base64 inclusion proof hash, leaf side first>
    ...
    <blank line>
    <signed checkpoint note>
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from gateway.audit._merkle import ProofError, Tree, verify_inclusion
from gateway.audit._note import Checkpoint, NoteError, Verifier, open_checkpoint
from gateway.audit._store import (
    CHECKPOINT,
    list_segments,
    read_checkpoints,
    read_data,
    split_records,
)
from gateway.errors import GatewayError

PROOF_HEADER = "c2sp.org/tlog-proof@v1"


class AuditToolError(GatewayError):
    """An audit CLI request cannot be met (no such record, size, checkpoint, bad proof)."""


class LogReader:
    """Read-only view of a log directory (the gateway may be writing it)."""

    def __init__(self, directory: Path) -> None:
        if not (directory / "segments").is_dir():
            raise AuditToolError(f"{directory} is not an audit log directory (no segments/)")
        self.directory = directory

    def records(self, end: int | None = None) -> list[bytes]:
        out: list[bytes] = []
        for _first, path in list_segments(self.directory):
            recs, _tail = split_records(read_data(path))
            out.extend(recs)
            if end is not None and len(out) >= end:
                return out[:end]
        return out

    def entry(self, index: int) -> bytes:
        segs = list_segments(self.directory)
        for n, (first, path) in enumerate(segs):
            nxt = segs[n + 1][0] if n + 1 < len(segs) else None
            if index >= first and (nxt is None or index < nxt):
                recs, _ = split_records(read_data(path))
                if index - first < len(recs):
                    return recs[index - first]
        raise AuditToolError(f"the log has no record {index}")

    def tree(self, size: int) -> Tree:
        recs = self.records(size)
        if len(recs) < size:
            raise AuditToolError(f"the log holds {len(recs)} records, fewer than {size}")
        tree = Tree()
        sha = hashlib.sha256
        for r in recs:
            tree.append(sha(b"\x00" + r).digest())
        return tree

    def checkpoint(self, size: int | None = None) -> str:
        """The latest signed checkpoint, or the one of exactly ``size`` records."""
        latest = self.directory / CHECKPOINT
        if size is None:
            try:
                return latest.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise AuditToolError(f"{self.directory} has no signed checkpoint yet") from None
        for note in reversed(read_checkpoints(self.directory)):
            if note.split("\n", 2)[1:2] == [str(size)]:
                return note
        raise AuditToolError(f"the log signed no checkpoint of size {size}")


def checkpoint_size(note: str) -> int:
    try:
        return int(note.split("\n", 2)[1])
    except (IndexError, ValueError):
        raise AuditToolError("malformed checkpoint note") from None


def format_proof(index: int, path: list[bytes], note: str) -> str:
    hashes = "".join(base64.b64encode(h).decode() + "\n" for h in path)
    return f"{PROOF_HEADER}\nindex {index}\n{hashes}\n{note}"


@dataclass(frozen=True)
class ParsedProof:
    index: int
    path: list[bytes]
    note: str
    extra: bytes | None


def parse_proof(text: str) -> ParsedProof:
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise AuditToolError("tlog-proof: no blank line before the checkpoint")
    lines = head.split("\n")
    if lines[0] != PROOF_HEADER:
        raise AuditToolError(f"tlog-proof: first line must be {PROOF_HEADER}")
    lines = lines[1:]
    extra = None
    if lines and lines[0].startswith("extra "):
        extra = _b64(lines.pop(0)[6:])
    if not lines or not lines[0].startswith("index "):
        raise AuditToolError("tlog-proof: missing 'index N' line")
    idx = lines.pop(0)[6:]
    if not idx.isdigit() or (idx != "0" and idx.startswith("0")):
        raise AuditToolError(f"tlog-proof: index {idx!r} is not a decimal integer")
    return ParsedProof(int(idx), [_b64(h) for h in lines], note, extra)


def _b64(s: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise AuditToolError(f"tlog-proof: {s[:20]!r} is not base64") from None


def verify_proof(text: str, verifier: Verifier, entry: bytes | None = None,
                 leaf_hash: bytes | None = None) -> tuple[int, Checkpoint]:
    """Check a tlog-proof offline: checkpoint signature, origin, and the inclusion path."""
    proof = parse_proof(text)
    try:
        cp, _ = open_checkpoint(proof.note, verifier, verifier.name)
    except NoteError as err:
        raise AuditToolError(f"tlog-proof checkpoint: {err}") from None
    if leaf_hash is None:
        if entry is None:
            raise AuditToolError("give the entry (its canonical bytes) or its leaf hash")
        leaf_hash = hashlib.sha256(b"\x00" + entry).digest()
    try:
        verify_inclusion(proof.index, cp.size, leaf_hash, proof.path, cp.root)
    except ProofError as err:
        raise AuditToolError(f"tlog-proof does not verify: {err}") from None
    return proof.index, cp
