"""The segment rule read a block at a time (``read_segment``, what ``verify`` uses) gives
exactly the verdicts of the rule on the whole file (``parse_segment``, what the gateway opens
the log with): the same records, torn tail, and damage at the same byte and index."""

from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

import pytest

from gateway.audit._segment import SegmentDamaged, Tail, parse_segment, read_segment


def _whole(data: bytes, last: bool) -> tuple[list[bytes], int, str | None, int | None, int]:
    try:
        seg = parse_segment(data, last=last, name="seg", first=100)
    except SegmentDamaged as err:
        good = data[:err.offset].split(b"\n")[:err.records]
        return good, 0, str(err), err.offset, err.records
    return seg.records, seg.torn, None, None, 0


def _blocks(path: Path, last: bool, chunk: int) -> tuple[list[bytes], int, str | None,
                                                         int | None, int]:
    tail = Tail()
    records: list[bytes] = []
    for block, got in read_segment(str(path), tail, last=last, name="seg", first=100,
                                   chunk=chunk):
        # The block starts with its records, in order (a float scan maps offsets to them).
        assert block.startswith(b"".join(r + b"\n" for r in got))
        records += got
    err = tail.damage
    if err is None:
        return records, tail.torn, None, None, 0
    return records, 0, str(err), err.offset, err.records


def _segment(rnd: random.Random) -> bytes:
    """Records, then (sometimes) zeros, torn bytes, hidden data, empty lines, a long line."""
    lines = [b'{"seq":%d,"x":"%s"}' % (i, b"ab" * rnd.randrange(40))
             for i in range(rnd.randrange(12))]
    data = b"".join(r + b"\n" for r in lines)
    for _ in range(rnd.randrange(3)):
        at = rnd.randrange(len(data) + 1)
        piece = rnd.choice([bytes(rnd.randrange(1, 50)), b'{"torn":', b"\n", b"\n\n",
                            b'{"hidden":1}\n', b"z" * 300, b"\x00" * 7 + b"x"])
        data = data[:at] + piece + data[at:]
    if rnd.random() < 0.4:
        data += rnd.choice([b'{"torn":1', b"\x00" * rnd.randrange(1, 500),
                            b'{"t"' + b"\x00" * 9, b"\x00" * 5 + b'{"t"',
                            b"\x00" * 5 + b'{"t"' + b"\x00" * 3 + b"x"])
    return data


@pytest.mark.parametrize("last", [True, False])
def test_blocks_give_the_verdicts_of_the_whole_file(tmp_path, last):
    rnd = random.Random(14)
    path = tmp_path / "seg.log"
    seen = {"damaged": 0, "torn": 0, "clean": 0}
    for _ in range(400):
        data = _segment(rnd)
        path.write_bytes(data)
        want = _whole(data, last)
        for chunk in (1, 2, 7, 16, 64, 333, 1 << 20):
            assert _blocks(path, last, chunk) == want, (data, chunk)
        seen["damaged" if want[2] else "torn" if want[1] else "clean"] += 1
    # The generator reaches every verdict.
    assert min(seen.values()) > 20 if last else seen["damaged"] > 100, seen


def test_an_empty_or_missing_segment(tmp_path):
    path = tmp_path / "seg.log"
    path.write_bytes(b"")
    tail = Tail()
    assert list(read_segment(str(path), tail, last=True)) == []
    assert (tail.torn, tail.damage) == (0, None)
    with pytest.raises(FileNotFoundError):
        list(read_segment(str(tmp_path / "gone.log"), Tail(), last=True))


@pytest.mark.parametrize("last", [True, False])
def test_long_runs_of_zeros(tmp_path, last):
    """An open segment's free space, many blocks of zeros (read a block at a time and compared
    with zeros, never joined), ends the segment, or hides data after it: the same verdicts."""
    recs = b"".join(b'{"seq":%d}\n' % i for i in range(50))
    cases = [
        recs + bytes(50_000),                                # free space
        recs + bytes(50_000) + b"x",                         # a byte hidden after it
        recs + bytes(20_000) + b'{"seq":50}\n' + bytes(30_000),   # a record hidden in it
        recs + b'{"torn":' + bytes(9_000),                   # a torn record, then free space
        recs + b'{"torn":' + bytes(9_000) + b"1" + bytes(5_000),
        recs[:-1] + bytes(12_345),                           # the last newline zeroed
        bytes(70_000),                                       # nothing but free space
    ]
    path = tmp_path / "seg.log"
    for data in cases:
        path.write_bytes(data)
        want = _whole(data, last)
        for chunk in (64, 1000, 4096, 5000, 1 << 20):
            assert _blocks(path, last, chunk) == want, (data[-80:], chunk)


def test_pieces_give_the_verdicts_of_the_whole_file(tmp_path):
    """A segment read as pieces cut just after newlines (workers sharing a segment): the
    pieces' records in order, up to the first piece that finds damage, and that damage, are
    the whole file's."""
    rnd = random.Random(15)
    path = tmp_path / "seg.log"
    for _ in range(300):
        data = _segment(rnd)
        last = rnd.random() < 0.5
        path.write_bytes(data)
        want = _whole(data, last)
        ends = [i + 1 for i, byte in enumerate(data) if byte == 10]
        cuts = sorted(rnd.sample(ends, min(len(ends), rnd.randrange(4))))
        bounds = [0, *cuts, None]
        records: list[bytes] = []
        got: tuple = ()
        for lo, hi in pairwise(bounds):
            tail, prior = Tail(), len(records)
            for _block, recs in read_segment(str(path), tail, last=last, name="seg",
                                             first=100 + prior, start=lo, stop=hi,
                                             chunk=rnd.choice([1, 7, 64, 1 << 20])):
                records += recs
            err = tail.damage
            if err is not None:
                got = (records, 0, str(err), err.offset, prior + err.records)
                break
            got = (records, tail.torn, None, None, 0)
        assert got == want, (data, cuts)
