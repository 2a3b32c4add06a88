"""Reading a log directory without the writer, and the two proof formats auditors exchange.

Standard library and ``cryptography`` only (see :mod:`gateway.audit.offline`). The reader
works while the gateway appends: it reads only complete records, and it proves only to sizes
some signed checkpoint covers, after checking that the records still give that root.

An inclusion proof is a c2sp.org/tlog-proof::

    c2sp.org/tlog-proof@v1
    [extra <base64>]
    index <I>
    <base64 inclusion proof hash, leaf side first>
    ...
    <blank line>
    <signed checkpoint note>

A consistency proof (RFC 9162 2.1.4) names both sizes, then one base64 hash a line::

    gateway.audit/consistency-proof@v1
    old <M>
    new <N>
    <base64 hash>
    ...
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path

from gateway.audit._merkle import ProofError, Tree, leaf_hash, verify_consistency, verify_inclusion
from gateway.audit._note import Checkpoint, NoteError, Verifier, open_checkpoint, parse_checkpoint
from gateway.audit._segment import SegmentDamaged, parse_segment
from gateway.audit._store import CHECKPOINT, SEGMENTS
from gateway.audit._store import scan_segments as list_segments
from gateway.audit._verify import history_lines
from gateway.errors import AuditDataError

PROOF_HEADER = "c2sp.org/tlog-proof@v1"
CONSISTENCY_HEADER = "gateway.audit/consistency-proof@v1"
_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,19})")


class Error(AuditDataError):
    """A request cannot be met: no such record, size or checkpoint, unreadable input."""


class VerificationError(Error):
    """Something was checked and does not hold: a signature, a proof, a record."""


class LogReader:
    """Read-only view of a log directory or export (the gateway may be writing it)."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        if not (directory / SEGMENTS).is_dir():
            raise Error(f"{directory} is not an audit log directory (no {SEGMENTS}/)")
        self.directory = directory

    def _segments(self) -> list[tuple[int, Path]]:
        segments, _strays = list_segments(self.directory)
        return segments

    def _read(self, n: int, segments: list[tuple[int, Path]]) -> list[bytes]:
        first, path = segments[n]
        try:
            return parse_segment(path.read_bytes(), last=n == len(segments) - 1,
                                 name=f"segment {path.name}", first=first).records
        except SegmentDamaged as err:
            raise VerificationError(f"{err}: the log is damaged, run `gateway audit verify`") \
                from None

    def records(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """Complete records ``[start, end)`` (to the last complete record if ``end`` is None)."""
        segments = self._segments()
        out: list[bytes] = []
        for n, (first, _path) in enumerate(segments):
            following = segments[n + 1][0] if n + 1 < len(segments) else None
            if end is not None and first >= end:
                break
            if following is not None and following <= start:
                continue
            recs = self._read(n, segments)
            lo = max(start - first, 0)
            hi = len(recs) if end is None else min(len(recs), end - first)
            if first + len(recs) != (following if following is not None else first + len(recs)):
                raise VerificationError(f"segment {segments[n][1].name} holds {len(recs)} "
                                        f"records but the next starts at {following}: the log "
                                        "is damaged, run `gateway audit verify`")
            out.extend(recs[lo:hi])
        if end is not None and len(out) < end - start:
            raise Error(f"the log holds {start + len(out)} complete records; there is no "
                        f"record {start + len(out)}")
        return out

    def size(self) -> int:
        segments = self._segments()
        return segments[-1][0] + len(self._read(len(segments) - 1, segments)) if segments else 0

    def entry(self, index: int) -> bytes:
        try:
            return self.records(index, index + 1)[0]
        except Error:
            raise Error(f"the log has no record {index}") from None

    def tree(self, size: int) -> Tree:
        tree = Tree()
        for leaf in map(leaf_hash, self.records(0, size)):
            tree.append(leaf)
        return tree

    def checkpoint(self, size: int | None = None) -> str:
        """The latest signed checkpoint, or the one of exactly ``size`` records (unverified:
        the caller checks it with the log key, or against the records)."""
        latest = self.directory / CHECKPOINT
        try:
            note = latest.read_text(encoding="utf-8")
        except FileNotFoundError:
            note = None
        except (OSError, UnicodeDecodeError) as err:
            raise Error(f"cannot read {latest}: {err}") from None
        if size is None:
            if note is None:
                raise Error(f"{self.directory} has no signed checkpoint yet")
            return note
        if note is not None and checkpoint_size(note) == size:
            return note
        for _n, hist, _torn in history_lines(self.directory):
            if hist is not None and checkpoint_size(hist, None) == size:
                return hist
        raise Error(f"the log signed no checkpoint of size {size}")

    def proving_tree(self, size: int) -> tuple[Tree, str]:
        """The tree of ``size`` records and the signed checkpoint of that size, after checking
        that the records still give the root it signs."""
        note = self.checkpoint(size)
        tree = self.tree(size)
        if tree.root(size) != checkpoint_root(note):
            raise VerificationError(f"records 0..{size - 1} no longer give the root the "
                                    f"checkpoint of size {size} signs: the log is damaged, "
                                    "run `gateway audit verify`")
        return tree, note


def note_body(note: str) -> str:
    split = note.find("\n\n")
    if split < 0:
        raise Error("malformed checkpoint note (no signature block)")
    return note[:split + 1]


def checkpoint_size(note: str, default: object = ...) -> int:
    try:
        return parse_checkpoint(note_body(note)).size
    except (Error, NoteError):
        if default is not ...:
            return default  # type: ignore[return-value]
        raise Error("malformed checkpoint note") from None


def checkpoint_root(note: str) -> bytes:
    try:
        return parse_checkpoint(note_body(note)).root
    except NoteError as err:
        raise Error(f"malformed checkpoint note: {err}") from None


def open_signed(note: str | bytes, verifier: Verifier, what: str = "checkpoint") -> Checkpoint:
    """A checkpoint signed by the log key for the log's origin, or :class:`VerificationError`."""
    try:
        cp, _ = open_checkpoint(note, verifier, verifier.name)
    except NoteError as err:
        raise VerificationError(f"{what}: {err}") from None
    return cp


# -- inclusion: c2sp.org/tlog-proof -------------------------------------------------------------

def format_proof(index: int, path: list[bytes], note: str) -> str:
    hashes = "".join(base64.b64encode(h).decode() + "\n" for h in path)
    return f"{PROOF_HEADER}\nindex {index}\n{hashes}\n{note}"


@dataclass(frozen=True)
class ParsedProof:
    index: int
    path: list[bytes]
    note: str
    extra: bytes | None


def _b64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error):
        raise VerificationError(f"{what}: {s[:20]!r} is not base64") from None


def _number(line: str, word: str, what: str) -> int:
    value = line[len(word) + 1:] if line.startswith(word + " ") else ""
    if not _DECIMAL.fullmatch(value):
        raise VerificationError(f"{what}: expected a line '{word} N', got {line[:40]!r}")
    return int(value)


def parse_proof(text: str) -> ParsedProof:
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise VerificationError("tlog-proof: no blank line before the checkpoint")
    lines = head.split("\n")
    if lines[0] != PROOF_HEADER:
        raise VerificationError(f"tlog-proof: first line must be {PROOF_HEADER}")
    lines = lines[1:]
    extra = None
    if lines and lines[0].startswith("extra "):
        extra = _b64(lines.pop(0)[6:], "tlog-proof")
    if not lines:
        raise VerificationError("tlog-proof: missing 'index N' line")
    index = _number(lines.pop(0), "index", "tlog-proof")
    return ParsedProof(index, [_b64(h, "tlog-proof") for h in lines], note, extra)


def verify_proof(text: str, verifier: Verifier, entry: bytes | None = None,
                 leaf: bytes | None = None) -> tuple[int, Checkpoint]:
    """Check a tlog-proof offline: checkpoint signature, origin, and the inclusion path."""
    proof = parse_proof(text)
    cp = open_signed(proof.note, verifier, "tlog-proof checkpoint")
    if leaf is None:
        if entry is None:
            raise Error("give the entry (its canonical bytes) or its leaf hash")
        leaf = leaf_hash(entry)
    try:
        verify_inclusion(proof.index, cp.size, leaf, proof.path, cp.root)
    except ProofError as err:
        raise VerificationError(f"tlog-proof does not verify: {err}") from None
    return proof.index, cp


# -- consistency ----------------------------------------------------------------------------------

def format_consistency(first: int, second: int, path: list[bytes]) -> str:
    hashes = "".join(base64.b64encode(h).decode() + "\n" for h in path)
    return f"{CONSISTENCY_HEADER}\nold {first}\nnew {second}\n{hashes}"


def parse_consistency(text: str) -> tuple[int, int, list[bytes]]:
    what = "consistency proof"
    if not text.endswith("\n"):
        raise VerificationError(f"{what}: must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or lines[0] != CONSISTENCY_HEADER:
        raise VerificationError(f"{what}: first line must be {CONSISTENCY_HEADER}, then "
                                "'old M' and 'new N'")
    first = _number(lines[1], "old", what)
    second = _number(lines[2], "new", what)
    return first, second, [_b64(h, what) for h in lines[3:]]


def verify_consistency_proof(old_note: str | bytes, new_note: str | bytes, proof_text: str,
                             verifier: Verifier) -> tuple[Checkpoint, Checkpoint]:
    """Check that the log signed in ``new_note`` extends the one in ``old_note``."""
    old = open_signed(old_note, verifier, "old checkpoint")
    new = open_signed(new_note, verifier, "new checkpoint")
    first, second, path = parse_consistency(proof_text)
    if (first, second) != (old.size, new.size):
        raise VerificationError(f"the proof is from size {first} to {second}, but the "
                                f"checkpoints have sizes {old.size} and {new.size}")
    if old.size == 0:
        if path:
            raise VerificationError("a consistency proof from size 0 must be empty")
        return old, new
    try:
        verify_consistency(old.size, new.size, old.root, new.root, path)
    except ProofError as err:
        raise VerificationError(f"consistency proof does not verify: {err}") from None
    return old, new
