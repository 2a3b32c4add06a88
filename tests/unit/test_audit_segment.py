"""The segment rule read a block at a time (``read_segment``, what ``verify`` uses) gives
exactly the verdicts of the rule on the whole file (``parse_segment``, what the gateway opens
the log with): the same records, torn tail, and damage at the same byte and index."""

from __future__ import annotations

import random
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
