"""RFC 6962 / RFC 9162 Merkle tree: hashing, proofs, and proof verification.

Names follow RFC 9162 section 2.1: MTH (Merkle Tree Hash), PATH (inclusion proof, 2.1.3),
PROOF/SUBPROOF (consistency proof, 2.1.4). Leaves are hashed with prefix 0x00 and interior
nodes with prefix 0x01 (RFC 9162 2.1.1), which keeps a leaf from ever posing as a node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from gateway.errors import AuditDataError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


class ProofError(AuditDataError, ValueError):
    """A proof does not verify (or is malformed); the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    """HASH(0x00 || d(m)), RFC 9162 2.1.1."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """HASH(0x01 || left || right), RFC 9162 2.1.1."""
    return _sha256(b"\x01" + left + right).digest()


_LEAF_PREFIX = _sha256(b"\x00")


def leaf_hashes(entries: list[bytes]) -> list[bytes]:
    """``leaf_hash`` of each entry: the same rule, without a Python call per entry (the
    verifier hashes a million records). Each hash continues a copy of one that has hashed the
    prefix already: no record is copied behind the prefix, and OpenSSL copies a context for
    less than it initialises one (bench/README.md)."""
    copy = _LEAF_PREFIX.copy
    out: list[bytes] = []
    append = out.append
    for e in entries:
        h = copy()
        h.update(e)
        append(h.digest())
    return out


_NODE_PREFIX = _sha256(b"\x01")


def _parents(nodes: list[bytes]) -> list[bytes]:
    """``node_hash`` of each pair (nodes[0], nodes[1]), (nodes[2], nodes[3]), ...: the same
    rule, without a Python call per node (and from a copy of the prefix's context, as in
    :func:`leaf_hashes`)."""
    copy = _NODE_PREFIX.copy
    out: list[bytes] = []
    append = out.append
    for left, right in zip(nodes[0::2], nodes[1::2], strict=True):
        h = copy()
        h.update(left + right)
        append(h.digest())
    return out


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n > 1): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


class Tree:
    """An append-only Merkle tree that keeps every complete subtree hash.

    ``_levels[h]`` holds, concatenated, the hashes of the complete aligned subtrees of 2**h
    leaves, so any MTH the proofs need is O(log n) lookups rather than a rehash. Memory is about
    64 bytes per leaf.
    """

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]

    @property
    def size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash (already ``leaf_hash``-ed)."""
        levels = self._levels
        levels[0] += leaf
        h = 0
        while len(levels[h]) % (2 * HASH_SIZE) == 0:
            pair = bytes(levels[h][-2 * HASH_SIZE:])
            parent = node_hash(pair[:HASH_SIZE], pair[HASH_SIZE:])
            if len(levels) == h + 1:
                levels.append(bytearray())
            levels[h + 1] += parent
            h += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def truncate(self, size: int) -> None:
        """Forget leaves from ``size`` on (used to roll back a batch that failed to commit)."""
        for h, level in enumerate(self._levels):
            del level[(size >> h) * HASH_SIZE:]

    def leaf(self, index: int) -> bytes:
        return bytes(self._levels[0][index * HASH_SIZE:(index + 1) * HASH_SIZE])

    def _mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]), RFC 9162 2.1.1, from stored complete subtrees where possible."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            h = n.bit_length() - 1
            i = (lo >> h) * HASH_SIZE
            return bytes(self._levels[h][i:i + HASH_SIZE])
        k = _split(n)
        return node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._mth(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[0:size]), RFC 9162 2.1.3.1, leaf-side hash first."""
        self._check_size(size)
        if not 0 <= index < size:
            raise ProofError(f"index {index} is not in a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._mth(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """PROOF(first, D[0:second]), RFC 9162 2.1.4.1."""
        self._check_size(second)
        if not 0 < first <= second:
            raise ProofError(f"no consistency proof from size {first} to size {second}")
        if first == second:
            return []
        return self._subproof(first, 0, second, True)

    def _subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if b else [self._mth(lo, hi)]
        k = _split(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, b), self._mth(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self._mth(lo, lo + k)]

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ProofError(f"tree size {size} is beyond the log's {self.size} records")


class CompactRange:
    """The right edge of a growing tree: enough to compute every root without storing leaves.

    Used by ``verify``, which needs roots at checkpoint sizes but never a proof.
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        self.append_subtree(0, leaf)

    def append_subtree(self, level: int, node: bytes) -> None:
        """Append the root of a perfect subtree of ``2**level`` leaves; the range's size must
        be a multiple of it (the subtree is aligned, as RFC 9162 2.1.1 splits the tree)."""
        if self.size & ((1 << level) - 1):
            raise ProofError(f"a subtree of 2**{level} leaves cannot start at {self.size}")
        n = self.size >> level
        stack = self._stack
        while n & 1:
            node = node_hash(stack.pop(), node)
            n >>= 1
        stack.append(node)
        self.size += 1 << level

    def extend(self, subtrees: Iterable[tuple[int, bytes]]) -> None:
        """Append aligned subtrees, left to right (as :func:`decompose` lists them)."""
        for level, node in subtrees:
            self.append_subtree(level, node)

    def copy(self) -> CompactRange:
        other = CompactRange()
        other._stack, other.size = list(self._stack), self.size
        return other

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        r = self._stack[-1]
        for h in reversed(self._stack[:-1]):
            r = node_hash(h, r)
        return r


class Levels:
    """Every complete aligned subtree hash over the leaves ``[start, start + len(leaves))``.

    Built level by level (one comprehension of :func:`node_hash`'s rule per level, the fastest
    way to hash a range in Python), so that a verifier working on one piece of a log can hand
    back the piece's aligned subtrees (:meth:`decompose`) and the main process stitches pieces
    exactly.
    """

    def __init__(self, start: int, leaves: list[bytes]) -> None:
        self.start = start
        self.end = start + len(leaves)
        # (index of the first node at this level, in units of 2**level leaves; the nodes)
        self._levels: list[tuple[int, list[bytes]]] = []
        lo, nodes = start, leaves
        while nodes:
            self._levels.append((lo, nodes))
            first = lo + (lo & 1)              # the first node with its right sibling in range
            pairs = nodes[first - lo:]
            if len(pairs) & 1:
                pairs = pairs[:-1]
            lo, nodes = first >> 1, _parents(pairs)

    def decompose(self, end: int | None = None) -> list[tuple[int, bytes]]:
        """The maximal aligned perfect subtrees covering ``[start, end)``, left to right."""
        end = self.end if end is None else end
        if not self.start <= end <= self.end:
            raise ProofError(f"{end} is outside [{self.start}, {self.end}]")
        out: list[tuple[int, bytes]] = []
        pos = self.start
        while pos < end:
            level = 0
            while (level + 1 < len(self._levels) and not pos & ((2 << level) - 1)
                   and pos + (2 << level) <= end):
                level += 1
            lo, nodes = self._levels[level]
            out.append((level, nodes[(pos >> level) - lo]))
            pos += 1 << level
        return out


def _check_hashes(path: Sequence[bytes], *named: bytes) -> None:
    for h in (*path, *named):
        if len(h) != HASH_SIZE:
            raise ProofError(f"hash of {len(h)} bytes, expected {HASH_SIZE}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes,
                              path: Sequence[bytes]) -> bytes:
    """The root that ``path`` proves ``leaf`` is at ``index`` under, RFC 9162 2.1.3.2."""
    _check_hashes(path, leaf)
    if not 0 <= index < size:
        raise ProofError(f"index {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes],
                     root: bytes) -> None:
    """Raise :class:`ProofError` unless ``path`` proves ``leaf`` at ``index`` under ``root``."""
    _check_hashes((), root)
    if root_from_inclusion_proof(index, size, leaf, path) != root:
        raise ProofError(f"inclusion proof for index {index} does not lead to the root "
                         f"of size {size}")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2: raise :class:`ProofError` unless size ``second`` extends ``first``."""
    _check_hashes(path, first_root, second_root)
    if not 0 < first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    if first == second:
        if path:
            raise ProofError("consistency proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError(f"two different roots for the same size {first}")
        return
    if not path:
        raise ProofError("empty consistency proof")
    path = list(path)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != first_root:
        raise ProofError(f"consistency proof does not lead to the root of size {first}")
    if sr != second_root:
        raise ProofError(f"consistency proof does not lead to the root of size {second}")
