"""Verification of a whole log directory or export, for auditors (``gateway audit verify``).

Runs with the standard library and ``cryptography`` only (see :mod:`gateway.audit.offline`).
Checks, in one pass over the segments: the segment files hold records and nothing else (the
rule in ``_segment.py``, the one the gateway opens the log with); every record is canonical
JSON of schema v1, holds its own index (``seq``) and the leaf hash of the record before it
(``prev``); every checkpoint verifies under the log's key and no two disagree (a fork); the RFC
6962 tree recomputed from the records has, at every signed size, the root the checkpoint signs;
the log is at least as long as its largest checkpoint (truncation) and as an archived or
witnessed checkpoint (rollback).

Only a signature vouches for a record: records after the largest checkpoint that verifies and
matches are counted as *not covered*, never passed. Exit statuses (``Report.status``): 0 every
record is covered and nothing is wrong; 1 damage; 3 no damage, but the newest records are not
covered by a signed checkpoint yet (a live log between checkpoints, or records appended by
someone without the key).

Each piece of the log (a segment, or with several workers a few MiB of a complete segment,
so that they finish together) is checked by a worker process; a worker returns the piece's
aligned perfect subtrees (RFC 9162 2.1.1 splits every tree into them), so the main process
joins the pieces into exactly the tree a single pass would build.
"""

from __future__ import annotations

import gc
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import accumulate, pairwise, repeat
from multiprocessing import get_context
from operator import itemgetter
from pathlib import Path
from typing import Any

from gateway.audit import _canonical
from gateway.audit._merkle import EMPTY_ROOT, CompactRange, Levels, leaf_hashes
from gateway.audit._note import NoteError, Verifier, open_checkpoint, parse_checkpoint
from gateway.audit._segment import SegmentDamaged, Tail, read_segment
from gateway.audit._store import CHECKPOINT, CHECKPOINTS, SEGMENTS
from gateway.audit._store import scan_segments as list_segments

SCHEMA_VERSION = 1
GENESIS_PREV = "0" * 64

#: Exit statuses of ``gateway audit verify`` (2 is a usage or input error, from the CLI).
OK, DAMAGED, NOT_COVERED = 0, 1, 3
_MAX_FINDINGS = 100
#: Bytes of a segment read and checked at a time inside a worker (bounds its memory, not its
#: results; see read_segment for why not the whole segment).
_CHUNK = 1 << 20
#: Bytes of a complete segment a worker task covers when several workers share the log: many
#: pieces (LPT order) let the workers finish together, where whole segments left one worker
#: idle for up to a segment at the end (bench/README.md).
_PIECE = 8 << 20
#: Records parsed and written back per call in the canonical check (see _check_batch).
_GROUP = 16
_V, _SEQ, _PREV = itemgetter("v"), itemgetter("seq"), itemgetter("prev")


@dataclass(frozen=True)
class Finding:
    """One problem: ``kind`` is a stable word (edited, deleted, reordered, truncated, rollback,
    fork, unsigned, bad-checkpoint, damaged), ``index`` the first record it concerns."""

    kind: str
    index: int | None
    message: str


@dataclass
class Report:
    """What ``verify`` found, as an auditor files it (``to_dict`` for ``--json``)."""

    directory: str
    origin: str
    key: str = ""
    records: int = 0
    segments: int = 0
    checkpoints: int = 0          # distinct signed checkpoints that verify
    bad_checkpoints: int = 0      # checkpoints that do not verify (signature, key, format)
    latest_checkpoint: int | None = None
    latest_root: str | None = None
    covered: int = 0              # records 0..covered-1 are vouched for by a signature
    not_covered: int = 0          # records after that
    since: int | None = None
    witness: int | None = None
    freshness: str = ""
    torn_bytes: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True only when nothing is wrong and every record is covered by a signature."""
        return self.status == OK

    @property
    def status(self) -> int:
        if self.findings:
            return DAMAGED
        return NOT_COVERED if self.not_covered else OK

    @property
    def first_bad_index(self) -> int | None:
        idx = [f.index for f in self.findings if f.index is not None]
        return min(idx) if idx else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, status=self.status, first_bad_index=self.first_bad_index)
        return d

    def summary(self) -> str:
        rate = self.records / self.seconds if self.seconds else 0
        bad = f", {self.bad_checkpoints} BAD" if self.bad_checkpoints else ""
        lines = [
            f"audit log   {self.directory}",
            f"origin      {self.origin}",
            f"key         {self.key}",
            f"records     {self.records} in {self.segments} segment(s)",
            f"checkpoints {self.checkpoints} verified{bad}; latest size "
            f"{self.latest_checkpoint}, root {self.latest_root}",
            f"covered     records 0..{self.covered - 1} are signed"
            if self.covered else "covered     no record is covered by a signed checkpoint",
            f"freshness   {self.freshness}",
            f"time        {self.seconds:.2f} s ({rate:,.0f} records/s)",
        ]
        if self.torn_bytes:
            lines.append(f"torn tail   {self.torn_bytes} bytes after the last record (a record "
                         "being written, or a crash mid-write): not a record, ignored")
        if self.findings:
            first = self.first_bad_index
            where = (f"first bad index {first}" if first is not None else
                     "no record index is in doubt (the damage is outside the records)")
            lines.append(f"result      FAILED: {len(self.findings)} problem(s), {where}")
            lines.extend(f"  [{f.kind}] {f.message}" for f in self.findings)
        elif self.not_covered:
            lines.append(f"result      NOT COVERED: records 0..{self.covered - 1} check out, but "
                         f"the {self.not_covered} newest record(s) {self.covered}.."
                         f"{self.records - 1} are not covered by a signed checkpoint yet. A "
                         "running gateway signs them within checkpoint_ms: rerun. On a stopped "
                         "log, the gateway died before signing them (its next start signs or "
                         "cuts them), or someone without the key appended them (exit 3)")
        else:
            lines.append("result      OK: every record is covered by a verified signature, and "
                         "every record, link, root and signature checks out")
        return "\n".join(lines)


class _Findings:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.total = 0

    def add(self, kind: str, index: int | None, message: str) -> None:
        self.total += 1
        if len(self.report.findings) < _MAX_FINDINGS:
            self.report.findings.append(Finding(kind, index, message))


# -- checkpoints ------------------------------------------------------------------------------

@dataclass
class _Signed:
    """The verified checkpoints by size, and those that did not verify."""

    roots: dict[int, bytes] = field(default_factory=dict)
    where: dict[int, str] = field(default_factory=dict)
    bad: list[tuple[int | None, str]] = field(default_factory=list)  # (claimed size, message)
    since: int | None = None
    witness: int | None = None
    given: list[str] = field(default_factory=list)   # which of --witness, --since were given

    def external_only(self, size: int) -> bool:
        """Whether only a checkpoint kept outside the log (--witness, --since) signs ``size``:
        then a log that lacks it or differs from it was rolled back or forked, not damaged."""
        return all(place in ("--witness", "--since") for place in self.where[size].split(" and "))


def history_lines(directory: Path) -> Iterable[tuple[int, str | None, bool]]:
    """(line number, note or None if the line is not a JSON string, torn) per history line.

    A last line without its newline is torn (the gateway died, or is writing it now).
    """
    import json

    try:
        data = (directory / CHECKPOINTS).read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    for n, line in enumerate(lines, start=1):
        if not line:
            continue
        torn = n == len(lines)
        try:
            note = json.loads(line)
        except ValueError:
            note = None
        yield n, note if isinstance(note, str) else None, torn


def _claimed_size(note: str) -> int | None:
    try:
        return parse_checkpoint(note[:note.index("\n\n") + 1]).size
    except (ValueError, NoteError):
        return None


def _load_checkpoints(directory: Path, verifier: Verifier, extra: dict[str, str],
                      found: _Findings) -> _Signed:
    signed = _Signed()
    notes: dict[str, list[str]] = {}   # note text -> where it was found (dedupe: report once)
    for n, note, torn in history_lines(directory):
        if note is None:
            if not torn:
                signed.bad.append((None, f"{CHECKPOINTS} line {n} is not a JSON string "
                                   "(garbage in the checkpoint history)"))
            continue
        notes.setdefault(note, []).append(f"{CHECKPOINTS} line {n}")
    try:
        latest = (directory / CHECKPOINT).read_bytes().decode("utf-8", errors="replace")
        notes.setdefault(latest, []).append(CHECKPOINT)
    except FileNotFoundError:
        pass
    for label, note in extra.items():
        notes.setdefault(note, []).append(label)
        signed.given.append(label)
    for note, places in notes.items():
        where = " and ".join(places)
        try:
            cp, _ = open_checkpoint(note, verifier, verifier.name)
        except NoteError as err:
            signed.bad.append((_claimed_size(note), f"the checkpoint in {where} does not "
                               f"verify: {err}"))
            continue
        if "--since" in places:
            signed.since = cp.size
        if "--witness" in places:
            signed.witness = cp.size
        seen = signed.roots.get(cp.size)
        if seen is None:
            signed.roots[cp.size] = cp.root
            signed.where[cp.size] = where
        elif seen != cp.root:
            found.add("fork", max(cp.size - 1, 0),
                      f"fork: two signed checkpoints of size {cp.size} have different roots "
                      f"({signed.where[cp.size]} and {where})")
    return signed


# -- segments ---------------------------------------------------------------------------------

@dataclass
class _Part:
    """What a worker found in one segment (indexes are absolute)."""

    start: int
    count: int
    torn: int
    findings: list[tuple[str, int, str]]
    runs: list[tuple[int, int, int]]        # (first, last, seq - index) of misplaced records
    breaks: list[int]                        # i: record i's prev is not record i-1's leaf hash
    first_prev: object                       # the first record's prev link
    last_leaf: str                           # hex leaf hash of the last record
    subtrees: list[tuple[int, bytes]]
    snapshots: dict[int, list[tuple[int, bytes]]]   # size -> subtrees of [start, size)
    damaged: bool = False                    # the piece's bytes end in damage (a zero gap)


def _check_batch(records: list[bytes], start: int, suspects: list[int]) -> tuple[list, list, list]:
    """Parse a batch: (seq per record, prev per record, findings); a record that is not a
    canonical v1 record gets a finding, seq ``start + k`` (in place) and prev ``None``.

    ``suspects`` are the batch positions of records whose bytes may hide a float or a non-ASCII
    key even when they equal their re-encoding (:func:`_suspects`): those are also walked.

    Fast path, a group of :data:`_GROUP` records at a time: each record is parsed on its own,
    and the group's parsed records are written back in one call, ``[A0,A1,...]``, and compared
    with ``R0,R1,...`` joined from the records. Equal joins mean every Ai equals its Ri: both
    are whole JSON texts (Ri parsed alone, Ai is orjson's output), so were one shorter, the
    other would be a whole JSON value followed by a comma, which is not JSON. One call per group
    instead of one per record, and only a group's parsed records alive at a time (holding more
    costs more in cache misses; bench/README.md). Any exception or mismatch sends the batch to
    the walk that names what is wrong, record by record, with
    :func:`_canonical.decode_canonical` (the one rule).
    """
    loads, dumps = _canonical.loads, _canonical.dumps
    try:
        versions: list[Any] = []
        seqs: list[Any] = []
        prevs: list[Any] = []
        for g in range(0, len(records), _GROUP):
            group = records[g:g + _GROUP]
            parsed = list(map(loads, group))
            if dumps(parsed)[1:-1] != b",".join(group):   # (a list's output: "[" ... "]")
                raise ValueError("not canonical")
            versions += map(_V, parsed)
            seqs += map(_SEQ, parsed)
            prevs += map(_PREV, parsed)
        # (a bool is an int equal to 1 or 0: check the type too)
        if set(versions) <= {SCHEMA_VERSION} and set(map(type, versions)) <= {int}:
            for k in suspects:
                _canonical.check(loads(records[k]))
            return seqs, prevs, []
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        pass  # _canonical.EncodingError is a ValueError
    walked_seqs: list[Any] = []
    walked_prevs: list[Any] = []
    findings: list[tuple[str, int, str]] = []
    for k, data in enumerate(records):
        i = start + k
        try:
            rec = _canonical.decode_canonical(data)
            if rec.get("v") != SCHEMA_VERSION or rec.get("v") is True:
                raise _canonical.EncodingError(f"schema version {rec.get('v')!r}, expected "
                                               f"{SCHEMA_VERSION}")
        except _canonical.EncodingError as err:
            findings.append(("edited", i, f"record {i} is damaged: {err}"))
            walked_seqs.append(i)
            walked_prevs.append(None)
            continue
        walked_seqs.append(rec.get("seq"))
        walked_prevs.append(rec.get("prev"))
    return walked_seqs, walked_prevs, findings


def _suspects(data: bytes, records: list[bytes]) -> list[int]:
    """Positions of the records (``data``'s first ``len(records)`` lines) whose bytes may
    still hide a float or a non-ASCII key after they equal their re-encoding (see
    ``_canonical.decode_canonical``): one scan of the whole segment, which finds none in a log
    the gateway wrote without dotted numbers in its strings."""
    if not _canonical.SCAN_ONLY_SUSPECTS:
        return list(range(len(records)))
    hits = _canonical.float_positions(data)
    out: set[int] = set()
    if hits:
        ends = list(accumulate(len(r) + 1 for r in records))   # offset after each newline
        out.update(k for k in map(bisect_right, repeat(ends), hits) if k < len(records))
    if not data.isascii():
        out.update(k for k, r in enumerate(records) if not r.isascii())
    return sorted(out)


def _scan(path: str, start: int, last: bool, cuts: tuple[int, ...], lo: int = 0,
          hi: int | None = None) -> _Part:
    """Check one segment whose first record is ``start``, or its piece of bytes ``[lo, hi)``
    whose first record is ``start`` (runs in a worker process)."""
    if last and hi is None:
        try:
            return _scan_once(path, start, True, cuts, strict=True, lo=lo)
        except SegmentDamaged:
            # A live gateway may have been writing the last segment while it was read (a
            # later page seen before an earlier one): read it once more before calling it
            # damage. Damage on disk is there both times.
            pass
    return _scan_once(path, start, last, cuts, strict=False, lo=lo, hi=hi)


def _scan_once(path: str, start: int, last: bool, cuts: tuple[int, ...], *,
               strict: bool, lo: int = 0, hi: int | None = None) -> _Part:
    """One pass over a segment or its piece ``[lo, hi)``, a block at a time
    (:func:`read_segment`): each block's records are parsed, hashed and linked, then only
    their leaf hashes are kept. ``strict``: raise :class:`SegmentDamaged` instead of
    reporting it."""
    findings: list[tuple[str, int, str]] = []
    tail = Tail()
    leaves: list[bytes] = []
    runs: list[tuple[int, int, int]] = []
    breaks: list[int] = []
    first_prev: object = None
    prev_leaf: str | None = None
    b = start   # index of the block's first record
    for block, records in read_segment(path, tail, last=last, name=f"segment {Path(path).name}",
                                       first=start, chunk=_CHUNK, start=lo, stop=hi):
        seqs, prevs, bad = _check_batch(records, b, _suspects(block, records))
        findings.extend(bad)
        damaged = {i - b for _kind, i, _msg in bad}
        hashes = leaf_hashes(records)
        hexes = list(map(bytes.hex, hashes))
        if b == start:
            first_prev = prevs[0]
        elif prevs[0] != prev_leaf and 0 not in damaged:
            breaks.append(b)
        # (a bool is an int equal to 1 or 0: check the type too)
        if seqs != list(range(b, b + len(records))) or set(map(type, seqs)) != {int}:
            for k, seq in enumerate(seqs):
                i = b + k
                d = seq - i if type(seq) is int else None
                if d is None:
                    findings.append(("edited", i, f"record {i} has no integer seq"))
                elif d:
                    if runs and runs[-1][1] == i - 1 and runs[-1][2] == d:
                        runs[-1] = (runs[-1][0], i, d)
                    else:
                        runs.append((i, i, d))
        if prevs[1:] != hexes[:-1]:
            breaks.extend(b + k for k in range(1, len(records))
                          if prevs[k] != hexes[k - 1] and k not in damaged)
        prev_leaf = hexes[-1]
        leaves.extend(hashes)
        b += len(records)
    if tail.damage is not None:
        if strict:
            raise tail.damage
        findings.append(("damaged", start + tail.damage.records, str(tail.damage)))
    levels = Levels(start, leaves)
    end = start + len(leaves)
    snapshots = {c: levels.decompose(c) for c in cuts if start < c <= end}
    return _Part(start, len(leaves), tail.torn, findings, runs, breaks, first_prev,
                 prev_leaf or "", levels.decompose(), snapshots, tail.damage is not None)


def _pieces(path: Path, first: int, limit: int) -> list[tuple[int, int, int | None]]:
    """(index of the first record, lo, hi) of pieces of about :data:`_PIECE` bytes of the
    complete segment ``path`` whose records are ``first`` .. ``limit - 1``, each cut just after
    a newline. The first index of each later piece is read from its first record's ``seq``: a
    guess only (the records are not checked yet), which :func:`verify_log` checks against the
    counts of the pieces before and rescans with the true index if it is wrong. Where no guess
    can be read, the piece runs on to the next cut."""
    found = [(first, 0)]
    try:
        size = path.stat().st_size
        n = size // _PIECE
        with open(path, "rb", buffering=0) as f:
            for k in range(1, n):
                window = os.pread(f.fileno(), 1 << 16, size * k // n)
                a = window.find(b"\n") + 1
                b = window.find(b"\n", a)
                try:
                    seq = _canonical.loads(window[a:b])["seq"] if a and b > 0 else None
                except (ValueError, TypeError, KeyError, RecursionError):
                    seq = None
                at = size * k // n + a
                if type(seq) is int and found[-1][0] < seq < limit and at > found[-1][1]:
                    found.append((seq, at))
    except OSError:
        del found[1:]   # (the worker reading the whole segment meets the error itself)
    ends: list[int | None] = [at for _seq, at in found[1:]]
    return [(seq, lo, hi) for (seq, lo), hi in zip(found, [*ends, None], strict=True)]


_Task = tuple[str, int, bool, tuple[int, ...], int, "int | None"]


def _scan_task(task: _Task) -> _Part:
    # The scan makes no reference cycles (every parsed record is freed by its refcount), so
    # the cycle collector only costs time here (a measurable share of the scan).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan(*task)
    finally:
        if enabled:
            gc.enable()


# -- joining the parts --------------------------------------------------------------------------

def _regions(runs: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Adjacent runs of misplaced records, grouped (a swap is two runs, one region)."""
    out: list[list[tuple[int, int, int]]] = []
    for run in runs:
        if out and out[-1][-1][1] == run[0] - 1:
            last = out[-1][-1]
            if last[2] == run[2]:
                out[-1][-1] = (last[0], run[1], run[2])  # one run split between segments
            else:
                out[-1].append(run)
        else:
            out.append([run])
    return out


def _describe(region: list[tuple[int, int, int]]) -> tuple[str, int, str]:
    a, b = region[0][0], region[-1][1]
    held = sorted((s + d, e + d) for s, e, d in region)
    permuted = held[0][0] == a and held[-1][1] == b and all(
        x[1] + 1 == y[0] for x, y in pairwise(held))
    if permuted:
        return ("reordered", a, f"records {a}..{b} are out of order (record {a} holds seq "
                f"{a + region[0][2]}): swapped or moved")
    d = region[0][2]
    if d > 0:
        return ("deleted", a, f"record {a} holds seq {a + d}: {d} record(s) before it were "
                "deleted or moved")
    return ("reordered", a, f"record {a} holds seq {a + d}: records were inserted, duplicated "
            "or moved before it")


def verify_log(directory: Path, verifier: Verifier, *, since: str | None = None,
               witness: str | None = None, jobs: int | None = None, key_source: str = "",
               progress: Callable[[int], object] | None = None) -> Report:
    """Verify the log in ``directory`` against the log key ``verifier``; see the module doc.

    ``since`` and ``witness`` are signed checkpoint notes kept outside the log (an archived
    one, the gateway's witness copy): the log must extend them, which is how a rollback of the
    whole directory shows. ``jobs`` worker processes check segments (default: one per CPU).
    """
    started = time.perf_counter()
    report = Report(str(directory), verifier.name,
                    key=f"{verifier.name}+{verifier.id.hex()}" + (f" ({key_source})"
                                                                 if key_source else ""))
    found = _Findings(report)
    extra = {k: v for k, v in (("--since", since), ("--witness", witness)) if v is not None}
    signed = _load_checkpoints(directory, verifier, extra, found)
    report.since, report.witness = signed.since, signed.witness
    sizes = sorted(signed.roots)
    report.checkpoints = len(sizes)
    if sizes:
        report.latest_checkpoint = sizes[-1]
        report.latest_root = signed.roots[sizes[-1]].hex()
    if not (directory / SEGMENTS).is_dir():
        found.add("damaged", None, f"{directory} holds no {SEGMENTS}/ directory: not an audit "
                  "log (or its records were deleted)")
    segments, strays = list_segments(directory)
    for name in strays:
        found.add("damaged", None, f"unexpected file {name} in the segment directory")
    report.segments = len(segments)

    jobs = jobs or os.cpu_count() or 1
    pool = (ProcessPoolExecutor(min(jobs, len(segments)), mp_context=get_context("fork"))
            if jobs > 1 and len(segments) > 1 else None)
    # (segment number, first index, lo, hi) of each piece, in log order.
    pieces: list[tuple[int, int, int, int | None]] = []
    for n, (first, path) in enumerate(segments):
        if pool is None or n == len(segments) - 1:
            # (the last segment stays whole: a live gateway may be writing it)
            pieces.append((n, first, 0, None))
        else:
            limit = segments[n + 1][0] if segments[n + 1][0] > first else first + (1 << 62)
            pieces.extend((n, *piece) for piece in _pieces(path, first, limit))

    def task(piece: tuple[int, int, int, int | None], start: int) -> _Task:
        n, _first, lo, hi = piece
        return (str(segments[n][1]), start, n == len(segments) - 1,
                tuple(s for s in sizes if s > start), lo, hi)

    def scan(which: list[int], starts: list[int], first: bool) -> list[_Part]:
        """Scan the pieces ``which`` (the largest first, so the workers end together)."""
        order = list(range(len(which)))
        if pool is not None:
            order.sort(key=lambda k: -_weight(pieces[which[k]], segments))
        run = pool.map if pool is not None else map
        done: list[_Part | None] = [None] * len(which)
        for k, part in zip(order, run(_scan_task, [task(pieces[which[k]], starts[which[k]])
                                                   for k in order]), strict=True):
            done[k] = part
            if progress is not None and first:
                progress(part.count)
        return [part for part in done if part is not None]

    try:
        misnamed = None
        guessed = [first for _n, first, _lo, _hi in pieces]
        parts = scan(list(range(len(pieces))), guessed, True)
        # A piece that ends in damage ends its segment: the records after a zero gap are not
        # records (the rule of parse_segment, on the whole segment).
        keep: list[int] = []
        for i in range(len(parts)):
            if not keep or pieces[keep[-1]][0] != pieces[i][0] or not parts[keep[-1]].damaged:
                keep.append(i)
        actual = [0]
        for i in keep:
            actual.append(actual[-1] + parts[i].count)
        wrong = [k for k, i in enumerate(keep) if guessed[i] != actual[k]]
        heads = [k for k in wrong if pieces[keep[k]][2] == 0]   # a segment's first piece
        if heads:
            # A segment was deleted, emptied or renamed: say so once, then re-check every
            # piece at the index where its records really are.
            k = heads[0]
            n = pieces[keep[k]][0]
            kind = "deleted" if guessed[keep[k]] > actual[k] else "damaged"
            misnamed = (kind, actual[k], f"segment {segments[n][1].name} starts at index "
                        f"{guessed[keep[k]]} but the segments before it hold {actual[k]} "
                        "records")
        starts = dict(zip(keep, actual, strict=False))
        again = dict(zip(wrong, scan([keep[k] for k in wrong], [starts.get(i, 0) for i in
                                                                range(len(pieces))], False),
                         strict=True))
        parts = [again.get(k, parts[i]) for k, i in enumerate(keep)]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _join(parts, signed, sizes, found)
    if misnamed and misnamed[1] not in {f.index for f in report.findings}:
        found.add(*misnamed)  # a renamed segment: its records themselves are in order
    report.seconds = time.perf_counter() - started
    report.findings.sort(key=lambda f: (f.index is None, f.index or 0))
    return report


def _weight(piece: tuple[int, int, int, int | None], segments: list[tuple[int, Path]]) -> int:
    """Bytes of a piece (a whole segment: its file's size), to hand the largest out first."""
    n, _first, lo, hi = piece
    if hi is not None:
        return hi - lo
    try:
        return segments[n][1].stat().st_size - lo
    except OSError:
        return 0


def _join(parts: list[_Part], signed: _Signed, sizes: list[int], found: _Findings) -> None:
    """Stitch the workers' results: links across segments, roots, coverage, freshness."""
    report = found.report
    tree = CompactRange()
    # Records whose link breaks a finding already explains: [lo, hi) ranges.
    explained: list[tuple[int, int]] = []
    runs: list[tuple[int, int, int]] = []
    breaks: list[int] = []
    prev = GENESIS_PREV
    mismatched: list[int] = []
    for part in parts:
        for kind, index, message in part.findings:
            found.add(kind, index, message)
            explained.append((index, index + 2))
        runs.extend(part.runs)
        breaks.extend(part.breaks)
        if part.count and part.first_prev != prev:
            breaks.append(part.start)
        prev = part.last_leaf or prev
        for size, subtrees in part.snapshots.items():
            at = tree.copy()
            at.extend(subtrees)
            if at.root() != signed.roots[size]:
                mismatched.append(size)
        tree.extend(part.subtrees)
        report.torn_bytes += part.torn
    total = report.records = tree.size
    if 0 in signed.roots and signed.roots[0] != EMPTY_ROOT:
        mismatched.append(0)
    regions = _regions(sorted(runs))
    for region in regions:
        kind, index, message = _describe(region)
        found.add(kind, index, message)
        explained.append((region[0][0], region[-1][1] + 2))
    for i in sorted(set(breaks)):
        if not any(lo <= i < hi for lo, hi in explained):
            found.add("edited", i - 1, f"record {i - 1} was altered: record {i}'s prev link "
                      f"does not match its hash (or record {i}'s link was changed)")
            explained.append((i, i + 2))
    # Roots: a mismatch after a record already named is the same damage, reported once.
    good = [s for s in sizes if s <= total and s not in mismatched]
    first_named = min((f.index for f in report.findings if f.index is not None), default=None)
    first_bad = min(mismatched, default=None)
    if first_bad is not None and (first_named is None or first_named >= first_bad):
        lo = max((s for s in good if s < first_bad), default=0)
        kind = "fork" if signed.external_only(first_bad) else "edited"
        found.add(kind, lo, f"the signed checkpoint of size {first_bad} does not match "
                  f"records {lo}..{first_bad - 1}: one of them was changed (or re-chained), or "
                  "this log is a fork of the one that signed it")
    deleted_at_end = (regions and regions[-1][-1][1] == total - 1 and regions[-1][-1][2] > 0
                      and total + regions[-1][-1][2] >= (sizes[-1] if sizes else 0))
    if sizes and sizes[-1] > total and not deleted_at_end:
        kind = "rollback" if signed.external_only(sizes[-1]) else "truncated"
        found.add(kind, total, f"the log holds {total} records but a signed checkpoint "
                  f"({signed.where[sizes[-1]]}) covers {sizes[-1]}: records {total}.."
                  f"{sizes[-1] - 1} are missing ("
                  + ("the directory was rolled back to an older copy, or truncated)"
                     if kind == "rollback" else "truncated)"))
    report.covered = covered = max((s for s in good if not mismatched or s < min(mismatched)),
                                   default=0)
    report.not_covered = total - covered if total > covered else 0
    if total and not sizes:
        found.add("unsigned", 0, f"no signed checkpoint verifies: none of the {total} records "
                  "is vouched for (checkpoints deleted, replaced, or signed by another key)")
    for claimed, message in signed.bad:
        claimed_at = None if claimed is None else min(claimed, covered) if claimed > covered \
            else max(claimed - 1, 0)
        found.add("bad-checkpoint", claimed_at, message)
        report.bad_checkpoints += 1
    fresh = [f"{label} checkpoint of size {size}" for label, size in
             (("the witness", signed.witness), ("the archived (--since)", signed.since))
             if size is not None]
    if len(fresh) < len(signed.given):
        report.freshness = ("FAILED: the " + " and the ".join(signed.given) + " checkpoint "
                            "given does not verify (see the findings)")
    elif fresh:
        report.freshness = ("checked: the log extends " + " and ".join(fresh)
                            if not any(f.kind in ("rollback", "fork") for f in report.findings)
                            else "FAILED: the log does not extend " + " and ".join(fresh))
    else:
        report.freshness = ("NOT CHECKED: give --witness (the gateway's witness copy) or "
                            "--since (an archived checkpoint); without a checkpoint kept "
                            "outside the log, a rollback of the whole directory to an older "
                            "copy cannot be detected")
