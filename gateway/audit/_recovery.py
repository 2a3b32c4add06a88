"""Opening an audit log after a stop or a crash: which records on disk to adopt.

:class:`Recovery` rebuilds the RFC 6962 tree from the segments, then pins it to what only
this gateway can produce: its signed checkpoints, its last commit tag (``_tags.py``) and the
witness copy of its latest checkpoint. It answers how many records to keep; everything else
(cutting the unacknowledged tail, recording that it did) is :meth:`AuditLog.open`'s. The
rules are stated in full in :meth:`AuditLog.open`'s docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.audit import _canonical, _tags
from gateway.audit._merkle import Tree, leaf_hash
from gateway.audit._note import Checkpoint, NoteError, Verifier, open_checkpoint
from gateway.audit._store import Store
from gateway.audit._tags import CommitTag
from gateway.audit._verify import GENESIS_PREV, SCHEMA_VERSION
from gateway.errors import AuditUnavailable

log = logging.getLogger("gateway.audit")


class AuditLogDamaged(AuditUnavailable):
    """The log on disk is damaged beyond a torn final record: the gateway must not serve."""

    def diagnostics(self) -> str:
        return (f"{self}\nThe audit log is left untouched for investigation. Run "
                "`gateway audit verify` on it; restore from a backup made with "
                "`gateway audit export` to resume serving.")


def chain_head(tree: Tree, size: int) -> str:
    """The chain head after ``size`` records: the last one's leaf hash, hex."""
    return GENESIS_PREV if size == 0 else tree.leaf(size - 1).hex()


@dataclass(frozen=True)
class Recovered:
    """What :meth:`Recovery.run` found: records to keep, records found, whether the last
    segment had a torn record, the tag trusted and the largest signed checkpoint (and note)."""

    keep: int
    found: int
    torn: bool
    tag: CommitTag | None
    checkpoint: tuple[Checkpoint, str] | None


class Recovery:
    """Rebuilds ``tree`` (empty) from ``store`` and decides which records to adopt."""

    def __init__(self, directory: Path, store: Store, tree: Tree, vkey: Verifier, origin: str,
                 witness: Path) -> None:
        self._directory = directory
        self._store = store
        self._tree = tree
        self._vkey = vkey
        self._origin = origin
        self._witness = witness

    def run(self, tag_key: bytes) -> Recovered:
        """Read every segment into the tree and check it; :class:`AuditLogDamaged` if the
        records cannot all be proven or cut (see :meth:`AuditLog.open`)."""
        best = self.signed_checkpoint()
        cp = best[0] if best else None
        # Records the checkpoint signs are pinned by its root: hash them only. Keep the
        # rest (from the last signed one on) to parse and chain-check.
        start = max(cp.size - 1, 0) if cp else 0
        tail: list[tuple[int, list[bytes]]] = []
        last_first = 0

        def on_segment(first: int, records: list[bytes]) -> None:
            nonlocal last_first
            last_first = first
            for r in records:
                self._tree.append(leaf_hash(r))
            if first + len(records) > start:
                lo = max(start - first, 0)
                tail.append((first + lo, records[lo:]))

        torn = self._store.open(on_segment)
        tag = self.last_tag(_tags.valid(tag_key, self._origin, self._store.read_tags()))
        keep = self.check(cp, tag, tail, last_first)
        self.check_witness(cp)
        return Recovered(keep, self._tree.size, torn is not None, tag, best)

    def head(self, size: int) -> str:
        """The chain head after ``size`` records: the last one's leaf hash, hex."""
        return chain_head(self._tree, size)

    def last_tag(self, tags: list[CommitTag]) -> CommitTag | None:
        """The tag to trust: the newest, unless it covers more records than there are and
        the one before it is intact: then it is the tag of the commit in flight, written
        just before its records (see ``FileStore._open_tags``), which a crash or power loss
        kept while the records were lost or torn; they were never acknowledged."""
        if (len(tags) > 1 and not tags[0].closed and tags[0].size > self._tree.size
                and tags[1].serial == tags[0].serial - 1 and tags[1].size <= self._tree.size
                and self.head(tags[1].size) == tags[1].head):
            log.warning("audit commit tag %d covers %d records but the log holds %d: the "
                        "commit in flight was lost, using tag %d", tags[0].serial,
                        tags[0].size, self._tree.size, tags[1].serial)
            return tags[1]
        return tags[0] if tags else None

    def signed_checkpoint(self) -> tuple[Checkpoint, str] | None:
        """The largest checkpoint this log signed (``checkpoint`` or the history's last line),
        verified with its own key: the log must still hold what it signed."""
        best = None
        for where, note in (("checkpoint", self._store.latest_checkpoint()),
                            ("checkpoints.jsonl", self._store.last_published())):
            if note is None:
                continue
            try:
                cp, _ = open_checkpoint(note, self._vkey, self._origin)
            except NoteError as err:
                raise AuditLogDamaged(f"{self._directory}/{where}: {err} (signed by "
                                      "another key, or edited)") from None
            if best is not None and cp.size == best[0].size and cp.root != best[0].root:
                raise AuditLogDamaged(f"{self._directory}: two signed checkpoints of "
                                      f"size {cp.size} disagree (a fork)")
            if best is None or cp.size > best[0].size:
                best = (cp, note)
        return best

    def check(self, cp: Checkpoint | None, tag: CommitTag | None,
                 tail: list[tuple[int, list[bytes]]], last_first: int) -> int:
        """Check the rebuilt tree against the signed checkpoint and the last commit tag, and
        the records after the checkpoint; return how many records to keep (see
        :meth:`AuditLog.open`).

        Records up to the checkpoint are pinned by its signed root (one hash each); records
        after it are pinned by the tag's chain head and their chain links checked one by one.
        """
        where = self._directory
        tree = self._tree
        pins: list[tuple[str, int, Callable[[], bool], str]] = [] if cp is None else [
            ("signed checkpoint", cp.size, lambda: tree.root(cp.size) == cp.root, "")]
        if tag is not None:
            pins.append(("last commit tag", tag.size, lambda: self.head(tag.size) == tag.head,
                         ", re-chained"))
        for what, size, matches, also in pins:
            if size > tree.size:
                raise AuditLogDamaged(
                    f"audit log {where} is truncated: the {what} covers {size} records but "
                    f"only {tree.size} are left (first missing index {tree.size})")
            if not matches():
                raise AuditLogDamaged(
                    f"audit log {where}: records before index {size} no longer match the "
                    f"{what} (edited, reordered{also} or replaced)")
        signed = cp.size if cp else 0
        covered = max(signed, tag.size if tag else 0)
        if tree.size > covered and not (tag is not None and not tag.closed
                                        and tag.size >= signed and covered >= last_first):
            raise AuditLogDamaged(self.unprovable(covered, tag, signed, last_first))
        prev = None
        for first, records in tail:
            for i, data in enumerate(records, start=first):
                if i >= covered:
                    return covered
                if prev is None:
                    prev = self.head(i)
                try:
                    rec = _canonical.decode_canonical(data)
                except _canonical.EncodingError as err:
                    raise AuditLogDamaged(f"audit log {where}: record {i}: {err}") from None
                link = rec.get("prev")
                if rec.get("v") != SCHEMA_VERSION or rec.get("seq") != i or link != prev:
                    raise AuditLogDamaged(
                        f"audit log {where}: record {i} does not follow record {i - 1} "
                        f"(seq {rec.get('seq')!r}, prev link "
                        f"{'ok' if link == prev else 'broken'})")
                prev = tree.leaf(i).hex()
        return covered

    def unprovable(self, covered: int, tag: CommitTag | None, signed: int,
                    last_first: int) -> str:
        """Why the records from index ``covered`` on cannot be adopted (see
        :meth:`AuditLog.open`)."""
        where, found = self._directory, self._tree.size
        first = f"first unprovable record index {covered}"
        if tag is None and signed == 0:
            why = (f"holds {found} records but no valid signed checkpoint and no valid commit "
                   "tag: nothing shows the gateway wrote them (checkpoints deleted, history "
                   "rewritten, or commit tags replaced)")
        elif tag is not None and tag.closed:
            why = (f"was closed cleanly at {tag.size} records, yet record {covered} and "
                   f"{found - covered - 1} more follow: they were added after the gateway "
                   "stopped, by something without its keys")
        else:
            if tag is None:
                because = "there is no valid commit tag (missing, replaced or another key's)"
            elif tag.size < signed:
                because = "the last commit tag is older than the latest checkpoint (replaced)"
            else:
                because = (f"they start before the last segment (at index {last_first}), "
                           "and one commit never spans two")
            why = (f"record {covered} and {found - covered - 1} more are covered by no signed "
                   "checkpoint and no commit tag, and are not the unacknowledged last commit "
                   f"of a gateway that died: {because}")
        return f"audit log {where} {why} ({first})"

    def check_witness(self, cp: Checkpoint | None) -> None:
        """Refuse a log older than the witness copy of its latest checkpoint (a rollback)."""
        path, where = self._witness, self._directory
        try:
            note = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return  # a new log, or one from before witness copies: the next checkpoint makes it
        except (OSError, UnicodeDecodeError) as err:
            raise AuditUnavailable(f"cannot read the audit witness copy {path}: {err}") from None
        try:
            witness, _ = open_checkpoint(note, self._vkey, self._origin)
        except NoteError as err:
            raise AuditLogDamaged(f"audit witness copy {path}: {err} (not a checkpoint of this "
                                  "log, or edited)") from None
        have = cp.size if cp else 0
        if witness.size > have:
            raise AuditLogDamaged(
                f"audit log {where} is older than its witness copy: its latest signed "
                f"checkpoint covers {have} records, the witness copy {path} covers "
                f"{witness.size} (the log directory was rolled back or replaced; if a restore "
                "from backup was meant, keep the witness copy as evidence and move it aside)")
        if self._tree.root(witness.size) != witness.root:
            raise AuditLogDamaged(
                f"audit log {where} does not extend its witness copy: its first "
                f"{witness.size} records differ from those the witness copy {path} signs "
                f"(log checkpoint size {have}, witness size {witness.size}; rewritten or "
                "replaced)")
