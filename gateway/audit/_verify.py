"""Offline verification of a whole log directory, for auditors (``gateway audit verify``).

Checks, in one pass over the segments: every record is canonical JSON of schema v1, holds its
own index (``seq``) and the leaf hash of the record before it (``prev``); the RFC 6962 tree
recomputed from the records has, at every published checkpoint size, the root that checkpoint
signs; every checkpoint verifies under the log's key; no two checkpoints disagree (a fork); the
log is at least as long as its largest checkpoint (truncation) and every record is covered by a
checkpoint (an unsigned tail is how an appended forgery looks); and, with ``--since``, that the
log extends an archived checkpoint.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateway.audit._canonical import EncodingError, decode_canonical
from gateway.audit._log import GENESIS_PREV, SCHEMA_VERSION
from gateway.audit._merkle import CompactRange
from gateway.audit._note import NoteError, Verifier, open_checkpoint
from gateway.audit._store import CHECKPOINT, StoreDamaged, list_segments, read_checkpoints

_MAX_FINDINGS = 100


@dataclass(frozen=True)
class Finding:
    """One problem: ``kind`` is a stable word (edited, deleted, reordered, truncated, forged,
    fork, not-canonical, bad-checkpoint, damaged), ``index`` the first record it concerns."""

    kind: str
    index: int | None
    message: str


@dataclass
class Report:
    """What ``verify`` found, as an auditor files it (``to_dict`` for ``--json``)."""

    directory: str
    origin: str
    records: int = 0
    segments: int = 0
    checkpoints: int = 0
    latest_checkpoint: int | None = None
    latest_root: str | None = None
    since: int | None = None
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_bad_index(self) -> int | None:
        idx = [f.index for f in self.findings if f.index is not None]
        return min(idx) if idx else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["first_bad_index"] = self.first_bad_index
        return d

    def summary(self) -> str:
        rate = self.records / self.seconds if self.seconds else 0
        lines = [
            f"audit log   {self.directory}",
            f"origin      {self.origin}",
            f"records     {self.records} in {self.segments} segment(s)",
            f"checkpoints {self.checkpoints} verified; latest size {self.latest_checkpoint}, "
            f"root {self.latest_root}",
        ]
        if self.since is not None:
            lines.append(f"extends     archived checkpoint of size {self.since}")
        lines.append(f"time        {self.seconds:.2f} s ({rate:,.0f} records/s)")
        if self.ok:
            lines.append("result      OK: every record, link, root and signature checks out")
        else:
            lines.append(f"result      FAILED: {len(self.findings)} problem(s), first bad index "
                         f"{self.first_bad_index}")
            lines.extend(f"  [{f.kind}] {f.message}" for f in self.findings)
        return "\n".join(lines)


class _Findings:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.indexes: set[int] = set()

    def add(self, kind: str, index: int | None, message: str) -> None:
        if index is not None and index in self.indexes:
            return
        if len(self.report.findings) < _MAX_FINDINGS:
            self.report.findings.append(Finding(kind, index, message))
        if index is not None:
            self.indexes.add(index)


def _load_checkpoints(directory: Path, verifier: Verifier, since: str | None,
                      found: _Findings) -> tuple[dict[int, bytes], int | None]:
    """Verified checkpoints by size, and the archived ``since`` size."""
    notes = []
    try:
        notes = [(n, "checkpoints.jsonl") for n in read_checkpoints(directory)]
    except StoreDamaged as err:
        found.add("damaged", None, str(err))
    latest = directory / CHECKPOINT
    if latest.exists():
        notes.append((latest.read_text(encoding="utf-8", errors="replace"), "checkpoint"))
    since_size = None
    if since is not None:
        notes.append((since, "--since"))
    roots: dict[int, tuple[bytes, str]] = {}
    for note, where in notes:
        try:
            cp, _ = open_checkpoint(note, verifier, verifier.name)
        except NoteError as err:
            found.add("bad-checkpoint", None, f"a checkpoint in {where} does not verify: {err}")
            continue
        if where == "--since":
            since_size = cp.size
        seen = roots.get(cp.size)
        if seen is None:
            roots[cp.size] = (cp.root, where)
            found.report.checkpoints += 1
        elif seen[0] != cp.root:
            found.add("fork", max(cp.size - 1, 0),
                      f"fork: two signed checkpoints of size {cp.size} have different roots "
                      f"({seen[1]} and {where})")
    return {s: r for s, (r, _) in roots.items()}, since_size


def verify_log(directory: Path, verifier: Verifier, *, since: str | None = None,
               allow_unsigned_tail: bool = False,
               progress: Callable[[int], None] | None = None) -> Report:
    """Verify the log in ``directory`` against the log key ``verifier``; see the module doc."""
    started = time.perf_counter()
    report = Report(str(directory), verifier.name)
    found = _Findings(report)
    roots, since_size = _load_checkpoints(directory, verifier, since, found)
    report.since = since_size
    sizes = sorted(roots)
    if sizes:
        report.latest_checkpoint = sizes[-1]
        report.latest_root = roots[sizes[-1]].hex()
    pending = iter(sizes)
    next_cp = next(pending, None)
    while next_cp == 0:
        next_cp = next(pending, None)
    cr = CompactRange()
    prev = GENESIS_PREV
    expect = 0  # the seq the next record should hold
    i = 0
    sha = hashlib.sha256
    try:
        segments = list_segments(directory)
    except StoreDamaged as err:
        found.add("damaged", None, str(err))
        segments = []
    if not (directory / "segments").is_dir():
        found.add("damaged", None, f"{directory} holds no segments/ directory: not an audit log")
    report.segments = len(segments)
    for n, (first, path) in enumerate(segments):
        data = path.read_bytes()
        body = data.rstrip(b"\x00")
        if first != i:
            found.add("deleted" if first > i else "damaged", i,
                      f"segment {path.name} starts at index {first} but {i} records precede it")
        if body and not body.endswith(b"\n"):
            cut = body.rfind(b"\n") + 1
            if n == len(segments) - 1:
                body = body[:cut]  # a record being written right now (or a torn tail)
            else:
                found.add("damaged", i + body.count(b"\n"),
                          f"segment {path.name} ends in a partial record")
                body = body[:cut]
        records = body.split(b"\n")
        records.pop()
        for data in records:
            try:
                rec = decode_canonical(data)
                seq = rec.get("seq")
                link = rec.get("prev")
                if rec.get("v") != SCHEMA_VERSION:
                    raise EncodingError(f"schema version {rec.get('v')!r}, expected "
                                        f"{SCHEMA_VERSION}")
            except EncodingError as err:
                found.add("edited", i, f"record {i} is damaged: {err}")
                seq, link = expect, None
            leaf = sha(b"\x00" + data).digest()
            if seq != expect:
                if type(seq) is not int:
                    found.add("edited", i, f"record {i} has no integer seq")
                elif seq > expect:
                    found.add("deleted", i, f"record {i} holds seq {seq}: "
                              f"{seq - expect} record(s) before it were deleted or moved")
                else:
                    found.add("reordered", i, f"record {i} holds seq {seq}: records are "
                              "reordered or duplicated")
                expect = seq if type(seq) is int else expect
            elif link is not None and link != prev:
                j = max(i - 1, 0)
                found.add("edited", j, f"record {j} was altered: record {i}'s prev link does "
                          f"not match its hash (or record {i}'s link itself was changed)")
            prev = leaf.hex()
            expect += 1
            cr.append(leaf)
            i += 1
            if i == next_cp:
                if cr.root() != roots[i]:
                    kind = "fork" if i == since_size else "edited"
                    found.add(kind, None if found.indexes else i - 1,
                              f"the signed checkpoint of size {i} does not match records "
                              f"0..{i - 1}: they were changed, or this log is a fork of the "
                              "one that signed it")
                next_cp = next(pending, None)
            if progress is not None and not i & 0x3FFF:
                progress(0x4000)
        if progress is not None:
            progress(i & 0x3FFF)
    report.records = i
    if sizes and sizes[-1] > i:
        found.add("truncated", i, f"the log was truncated: a signed checkpoint covers "
                  f"{sizes[-1]} records but the log ends at index {i - 1}; records "
                  f"{i}..{sizes[-1] - 1} are missing")
    covered = sizes[-1] if sizes else 0
    if i > covered and not allow_unsigned_tail:
        found.add("forged", covered, f"records {covered}..{i - 1} are not covered by any signed "
                  "checkpoint: appended after the last checkpoint (forged, or written since; "
                  "rerun, or pass --allow-unsigned-tail for a live log)")
    report.seconds = time.perf_counter() - started
    report.findings.sort(key=lambda f: (f.index is None, f.index or 0))
    return report
