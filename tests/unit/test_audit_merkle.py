"""RFC 6962 / 9162 Merkle tree against the published vectors (transparency-dev/merkle, RFC 9162)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.audit._merkle import (
    EMPTY_ROOT,
    CompactRange,
    ProofError,
    Tree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# The shared public vectors sit beside the repository (../shared), as in CI.
_VECTOR_FILE = next((p for p in (Path(__file__).resolve().parents[3] / "shared",
                                 Path("/work/shared")) if (p / "testdata").is_dir()),
                    Path("/work/shared")) / "testdata" / "tlog_vectors.json"
VECTORS = json.loads(_VECTOR_FILE.read_text())
REF = VECTORS["reference_tree"]
LEAVES = [bytes.fromhex(x) for x in REF["leaves_hex"]]


def _tree(n: int) -> Tree:
    t = Tree()
    for leaf in LEAVES[:n]:
        t.append(leaf_hash(leaf))
    return t


def test_hasher_vectors():
    h = VECTORS["rfc6962_hasher"]
    assert EMPTY_ROOT.hex() == h["empty_root"]
    for c in h["leaf_cases"]:
        assert leaf_hash(bytes.fromhex(c["leaf_hex"])).hex() == c["leaf_hash"]
    for c in h["node_cases"]:
        assert node_hash(bytes.fromhex(c["left_hex"]),
                         bytes.fromhex(c["right_hex"])).hex() == c["node_hash"]


def test_reference_tree_roots_every_size():
    t = Tree()
    cr = CompactRange()
    assert t.root().hex() == REF["roots_by_size"][0] == cr.root().hex()
    for n, leaf in enumerate(LEAVES, start=1):
        t.append(leaf_hash(leaf))
        cr.append(leaf_hash(leaf))
        assert t.root().hex() == REF["roots_by_size"][n]
        assert cr.root().hex() == REF["roots_by_size"][n]
        for m in range(n + 1):  # older roots stay reachable from the grown tree
            assert t.root(m).hex() == REF["roots_by_size"][m]


def test_reference_tree_node_hashes():
    t = _tree(8)
    for level, hashes in enumerate(REF["node_hashes_by_level"]):
        for i, h in enumerate(hashes):
            assert t._mth(i << level, (i + 1) << level).hex() == h


def test_rfc9162_example_proofs():
    ex = VECTORS["rfc9162_example"]
    t = _tree(ex["tree_size"])
    named = {k: t._mth(lo, hi) for k, (lo, hi) in ex["names"].items()}
    for c in ex["inclusion"]:
        assert t.inclusion_proof(c["leaf_index"], ex["tree_size"]) == [named[n] for n in c["path"]]
    for c in ex["consistency"]:
        assert t.consistency_proof(c["first"], ex["tree_size"]) == [named[n] for n in c["proof"]]


@pytest.mark.parametrize("case", VECTORS["inclusion_probes"]["cases"], ids=lambda c: c["file"])
def test_inclusion_probes(case):
    args = (case["leaf_index"], case["tree_size"], bytes.fromhex(case["leaf_hash"]),
            [bytes.fromhex(p) for p in case["proof"]], bytes.fromhex(case["root"]))
    if case["expect_valid"]:
        verify_inclusion(*args)
    else:
        with pytest.raises(ProofError):
            verify_inclusion(*args)


@pytest.mark.parametrize("case", VECTORS["consistency_probes"]["cases"], ids=lambda c: c["file"])
def test_consistency_probes(case):
    args = (case["size1"], case["size2"], bytes.fromhex(case["root1"]),
            bytes.fromhex(case["root2"]), [bytes.fromhex(p) for p in case["proof"]])
    if case["expect_valid"]:
        verify_consistency(*args)
    else:
        with pytest.raises(ProofError):
            verify_consistency(*args)


def test_generated_proofs_verify_and_corruptions_fail():
    t = Tree()
    for i in range(40):
        t.append(leaf_hash(b"leaf %d" % i))
    for n in range(1, 41):
        root = t.root(n)
        for i in range(n):
            path = t.inclusion_proof(i, n)
            verify_inclusion(i, n, t.leaf(i), path, root)
            if path:
                bad = [*path[:-1], bytes(32)]
                with pytest.raises(ProofError):
                    verify_inclusion(i, n, t.leaf(i), bad, root)
            with pytest.raises(ProofError):
                verify_inclusion(i, n, leaf_hash(b"other"), path, root)
        for m in range(1, n + 1):
            proof = t.consistency_proof(m, n)
            verify_consistency(m, n, t.root(m), root, proof)
            if m < n:
                with pytest.raises(ProofError):
                    verify_consistency(m, n, t.root(m), root, proof[:-1])
                with pytest.raises(ProofError):
                    verify_consistency(m, n, leaf_hash(b"x"), root, proof)


def test_truncate_rolls_back():
    t = Tree()
    for i in range(13):
        t.append(leaf_hash(b"%d" % i))
    root7 = t.root(7)
    t.truncate(7)
    assert t.size == 7 and t.root() == root7
    for i in range(7, 13):
        t.append(leaf_hash(b"%d" % i))
    u = Tree()
    for i in range(13):
        u.append(leaf_hash(b"%d" % i))
    assert t.root() == u.root()


def test_levels_pieces_join_to_the_reference_roots():
    """Leaves from a random start, cut at every end: the aligned subtrees ``Levels`` hands back
    join (CompactRange, as ``verify``'s main process does) into the root of that size (the
    published roots, then ``Tree``'s over 300 leaves); ``leaf_hashes`` is ``leaf_hash`` of
    each entry."""
    import random

    from gateway.audit._merkle import Levels, leaf_hashes

    rnd = random.Random(9162)
    many = [rnd.randbytes(rnd.randrange(40)) for _ in range(300)]
    tree = Tree()
    tree.extend(map(leaf_hash, many))
    for entries, roots, rounds in ((LEAVES, REF["roots_by_size"], 8),
                                   (many, [tree.root(n).hex() for n in range(301)], 12)):
        leaves = leaf_hashes(entries)
        assert leaves == [leaf_hash(x) for x in entries]
        n = len(leaves)
        for start in [0, *(rnd.randrange(n) for _ in range(rounds))]:
            levels = Levels(start, leaves[start:])
            for end in range(start, n + 1):
                head = CompactRange()
                for leaf in leaves[:start]:
                    head.append(leaf)
                head.extend(levels.decompose(end))
                assert (head.size, head.root().hex()) == (end, roots[end])
