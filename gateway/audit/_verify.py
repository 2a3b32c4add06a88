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
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from multiprocessing import get_context
from pathlib import Path

import orjson

from gateway.audit._canonical import EncodingError, check, float_positions
from gateway.audit._log import GENESIS_PREV, SCHEMA_VERSION
from gateway.audit._merkle import EMPTY_ROOT, CompactRange, node_hash
from gateway.audit._note import NoteError, Verifier, open_checkpoint
from gateway.audit._store import (
    CHECKPOINT,
    StoreDamaged,
    list_segments,
    read_checkpoints,
    read_data,
)

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


#: Records per verification chunk: a power of two, so a full chunk is one perfect subtree.
CHUNK = 1 << 15


@dataclass
class _Chunk:
    """What one chunk scan found; the first record's seq/link are checked by the caller."""

    findings: list[tuple[str, int, str]]
    count: int
    first_seq: object
    first_link: object
    next_expect: object
    last_prev: str
    snapshots: dict[int, list[bytes]]   # absolute size -> compact range of the chunk's prefix
    stack: list[bytes]


def _suspects(blob: bytes, records: list[bytes]) -> set[int]:
    """Indexes (in ``records``) of records that need the exact value walk of
    :func:`~gateway.audit._canonical.check`: non-ASCII bytes, or bytes that may be a float.
    One scan of the whole chunk instead of one call per record."""
    hits = float_positions(blob)
    out: set[int] = set()
    if hits:
        ends = list(accumulate(len(r) + 1 for r in records))
        out.update(bisect_right(ends, h) for h in hits)
    if not blob.isascii():
        out.update(k for k, r in enumerate(records) if not r.isascii())
    return out


def _scan(pieces: list[tuple[str, int, int]], start: int, cuts: tuple[int, ...]) -> _Chunk:
    """Check records ``start..`` read from byte ranges of segment files (runs in a worker).

    This is the hot loop of ``verify`` (issue target: 200,000 records/s), so the canonical
    check of :func:`~gateway.audit._canonical.decode_canonical` and the compact-range append
    are inlined here; they must stay equivalent to those functions.
    """
    blob = bytearray()
    for path, a, b in pieces:
        with open(path, "rb") as f:
            f.seek(a)
            blob += f.read(b - a)
    blob = bytes(blob)
    records = blob.split(b"\n")
    records.pop()
    suspects = _suspects(blob, records)
    findings: list[tuple[str, int, str]] = []
    stack: list[bytes] = []   # compact range of the chunk's prefix (RFC 6962 right edge)
    sha = hashlib.sha256
    loads, dumps = orjson.loads, orjson.dumps
    opts = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
    cutset = set(cuts)
    snapshots: dict[int, list[bytes]] = {}
    first_seq = first_link = expect = None
    prev = None
    for k, data in enumerate(records):
        i = start + k
        try:
            rec = loads(data)
            if type(rec) is not dict:
                raise EncodingError("not a JSON object")
            if dumps(rec, option=opts) != data:
                raise EncodingError("not in RFC 8785 canonical form")
            if k in suspects:
                check(rec)
            seq = rec.get("seq")
            link = rec.get("prev")
            if rec.get("v") != SCHEMA_VERSION:
                raise EncodingError(f"schema version {rec.get('v')!r}, expected "
                                    f"{SCHEMA_VERSION}")
        except orjson.JSONDecodeError as err:
            findings.append(("edited", i, f"record {i} is damaged: not valid JSON ({err})"))
            seq, link = expect, None
        except orjson.JSONEncodeError:
            findings.append(("edited", i, f"record {i} is damaged: an integer is outside the "
                             "I-JSON range"))
            seq, link = expect, None
        except EncodingError as err:
            findings.append(("edited", i, f"record {i} is damaged: {err}"))
            seq, link = expect, None
        if k == 0:
            first_seq, first_link = seq, link
        elif seq != expect:
            if type(seq) is not int:
                findings.append(("edited", i, f"record {i} has no integer seq"))
            elif expect is not None and seq > expect:
                findings.append(("deleted", i, f"record {i} holds seq {seq}: {seq - expect} "
                                 "record(s) before it were deleted or moved"))
            else:
                findings.append(("reordered", i, f"record {i} holds seq {seq}: records are "
                                 "reordered or duplicated"))
        elif link is not None and link != prev:
            findings.append(("edited", i - 1, f"record {i - 1} was altered: record {i}'s prev "
                             f"link does not match its hash (or record {i}'s link was changed)"))
        expect = seq + 1 if type(seq) is int else (None if expect is None else expect + 1)
        node = sha(b"\x00" + data).digest()
        prev = node.hex()
        n = k
        while n & 1:
            node = sha(b"\x01" + stack.pop() + node).digest()
            n >>= 1
        stack.append(node)
        if i + 1 in cutset:
            snapshots[i + 1] = list(stack)
    return _Chunk(findings, len(records), first_seq, first_link, expect, prev or "",
                  snapshots, stack)


def _scan_task(task: tuple[list, int, tuple[int, ...]]) -> _Chunk:
    return _scan(*task)


def _fold(stack: list[bytes]) -> bytes:
    if not stack:
        return EMPTY_ROOT
    r = stack[-1]
    for h in reversed(stack[:-1]):
        r = node_hash(h, r)
    return r


def _plan(segments: list[tuple[int, Path]], found: _Findings) -> Iterator[tuple[list, int]]:
    """Cut the log into aligned chunks of byte ranges; check segment names and partial tails.

    A generator, so that workers start on the first chunks while later segments are read.
    The record count ends up in ``found.report.records``.
    """
    found.report.segments = len(segments)
    pieces: list[tuple[str, int, int]] = []
    chunk_start = 0
    i = 0
    for n, (first, path) in enumerate(segments):
        last = n == len(segments) - 1
        body = read_data(path) if last else path.read_bytes().rstrip(b"\x00")
        if first != i:
            found.add("deleted" if first > i else "damaged", i,
                      f"segment {path.name} starts at index {first} but {i} records precede it")
        if body and not body.endswith(b"\n"):
            if not last:
                found.add("damaged", i + body.count(b"\n"),
                          f"segment {path.name} ends in a partial record")
            body = body[:body.rfind(b"\n") + 1]  # last segment: a record being written now
        lines = body.split(b"\n")
        lines.pop()
        pos = 0
        k = 0
        while k < len(lines):
            take = min(CHUNK - (i - chunk_start), len(lines) - k)
            size = sum(map(len, lines[k:k + take])) + take
            pieces.append((str(path), pos, pos + size))
            pos += size
            k += take
            i += take
            found.report.records = i
            if i - chunk_start == CHUNK:
                yield pieces, chunk_start
                pieces, chunk_start = [], i
    if pieces:
        yield pieces, chunk_start


def verify_log(directory: Path, verifier: Verifier, *, since: str | None = None,
               allow_unsigned_tail: bool = False, jobs: int | None = None,
               progress: Callable[[int], None] | None = None) -> Report:
    """Verify the log in ``directory`` against the log key ``verifier``; see the module doc.

    Large logs are checked in aligned chunks of :data:`CHUNK` records by ``jobs`` worker
    processes (default: one per CPU); the chunk results are stitched together exactly, since a
    full aligned chunk is one perfect subtree of the RFC 6962 tree.
    """
    started = time.perf_counter()
    report = Report(str(directory), verifier.name)
    found = _Findings(report)
    roots, since_size = _load_checkpoints(directory, verifier, since, found)
    report.since = since_size
    sizes = sorted(roots)
    if sizes:
        report.latest_checkpoint = sizes[-1]
        report.latest_root = roots[sizes[-1]].hex()
    if not (directory / "segments").is_dir():
        found.add("damaged", None, f"{directory} holds no segments/ directory: not an audit log")
    try:
        segments = list_segments(directory)
    except StoreDamaged as err:
        found.add("damaged", None, str(err))
        segments = []
    jobs = jobs or os.cpu_count() or 1
    tasks: list[tuple[list, int, tuple[int, ...]]] = []

    def plan() -> Iterator[tuple[list, int, tuple[int, ...]]]:
        for pieces, start in _plan(segments, found):
            task = (pieces, start, tuple(s for s in sizes if start < s <= start + CHUNK))
            tasks.append(task)
            yield task

    pool = None
    if jobs > 1 and sizes and sizes[-1] > CHUNK:
        pool = ProcessPoolExecutor(jobs, mp_context=get_context("fork"))
        results = pool.map(_scan_task, plan())
    else:
        results = map(_scan_task, plan())
    expect, prev = 0, GENESIS_PREV
    upper = CompactRange()  # over full chunks' roots
    try:
        for res in results:
            _pieces, start, cuts = tasks.pop(0)
            for kind, index, message in res.findings:
                found.add(kind, index, message)
            if res.count:
                if res.first_seq != expect and type(res.first_seq) is int:
                    kind = "deleted" if res.first_seq > expect else "reordered"
                    found.add(kind, start, f"record {start} holds seq {res.first_seq}: records "
                              "deleted, moved or reordered")
                elif res.first_link is not None and res.first_link != prev:
                    j = max(start - 1, 0)
                    found.add("edited", j, f"record {j} was altered: record {start}'s prev link "
                              f"does not match its hash (or record {start}'s link was changed)")
            expect = res.next_expect if res.next_expect is not None else start + res.count
            prev = res.last_prev or prev
            for size in cuts:
                if size not in res.snapshots:
                    continue  # the log ends before it: reported as a truncation below
                root = _fold(upper._stack + res.snapshots[size])
                if root != roots[size]:
                    kind = "fork" if size == since_size else "edited"
                    found.add(kind, None if found.indexes else size - 1,
                              f"the signed checkpoint of size {size} does not match records "
                              f"0..{size - 1}: they were changed, or this log is a fork of the "
                              "one that signed it")
            if res.count == CHUNK:
                upper.append(res.stack[0])
            if progress is not None:
                progress(res.count)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    total = report.records
    if sizes and sizes[-1] > total:
        found.add("truncated", total, f"the log was truncated: a signed checkpoint covers "
                  f"{sizes[-1]} records but the log ends at index {total - 1}; records "
                  f"{total}..{sizes[-1] - 1} are missing")
    covered = sizes[-1] if sizes else 0
    if total > covered and not allow_unsigned_tail:
        found.add("forged", covered, f"records {covered}..{total - 1} are not covered by any "
                  "signed checkpoint: appended after the last checkpoint (forged, or written "
                  "since; rerun, or pass --allow-unsigned-tail for a live log)")
    report.seconds = time.perf_counter() - started
    report.findings.sort(key=lambda f: (f.index is None, f.index or 0))
    return report
