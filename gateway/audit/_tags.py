"""Commit tags: the gateway's keyed proof, written before any acknowledgement, of what it wrote.

A signed checkpoint covers records only some time after they were acknowledged (at most
``checkpoint_ms``). Without more, records after the last checkpoint are provable by nobody:
on open the gateway could not tell its own acknowledged records from chain-valid ones that
someone without the signing key appended. So every group commit, after its records are on
disk and before any of them is acknowledged, also writes a *commit tag*::

    gwtag1 <serial, 20 digits> <size, 20 digits> <chain head, 64 hex> <closed 0|1> <HMAC, 64 hex>

The HMAC-SHA256 (key ``commit.key`` beside the signing key) is over the log's origin, a
newline and everything before the HMAC. The chain head is the leaf hash of record
``size - 1`` (64 zeros for an empty log): each record names the leaf hash of the one before
it, so the head pins every record of the prefix. ``closed`` is 1 only in the tag written by
a clean close, after the final checkpoint; nothing may follow it.

The tags live in the sidecar file ``commit-tags`` of the log directory, in two fixed slots
(4 KiB apart, so a torn write of one never touches the other); tag ``serial`` goes to slot
``serial % 2``. The slot being written may be torn by a crash, the other still holds the
previous tag, which covers every record acknowledged before the commit in flight. Where the
tag rides the records' flush (``FileStore._open_tags``) it is written just before them, so a
crash may keep a tag whose records never landed; the previous tag then still covers
everything acknowledged. The
record, segment and checkpoint formats are unchanged: auditors cannot check a tag (the key
is secret) and need not; it is the gateway's own evidence for its own recovery.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

TAGS = "commit-tags"
SLOT_BYTES = 4096
SLOTS = 2
_VERSION = "gwtag1"


@dataclass(frozen=True)
class CommitTag:
    """The log held ``size`` records ending in leaf hash ``head`` when tag ``serial`` was made."""

    serial: int
    size: int
    head: str
    closed: bool = False


def _mac(key: bytes, origin: str, body: str) -> str:
    keyed = _keyed.get(key)
    if keyed is None:  # one key per log: the key schedule once, a copy per tag
        if len(_keyed) >= 8:
            _keyed.clear()
        keyed = _keyed[key] = hmac.new(key, digestmod=hashlib.sha256)
    mac = keyed.copy()
    mac.update(f"{origin}\n{body}".encode())
    return mac.hexdigest()


#: Keyed HMAC-SHA256 states by key, copied for each tag (a commit writes one).
_keyed: dict[bytes, hmac.HMAC] = {}


def seal(key: bytes, origin: str, tag: CommitTag) -> bytes:
    """The tag's line (fixed length, so a new tag overwrites an old one whole)."""
    body = f"{_VERSION} {tag.serial:020d} {tag.size:020d} {tag.head} {int(tag.closed)}"
    return f"{body} {_mac(key, origin, body)}\n".encode()


def unseal(key: bytes, origin: str, slot: bytes) -> CommitTag | None:
    """The tag in ``slot``, or None if it is empty, torn, or not made with ``key``."""
    line, newline, _ = slot.partition(b"\n")
    if not newline:
        return None
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    body, _, mac = text.rpartition(" ")
    parts = body.split(" ")
    if (len(parts) != 5 or parts[0] != _VERSION or parts[4] not in ("0", "1")
            or not (parts[1].isdigit() and parts[2].isdigit()) or len(parts[3]) != 64
            or not hmac.compare_digest(mac, _mac(key, origin, body))):
        return None
    return CommitTag(int(parts[1]), int(parts[2]), parts[3], parts[4] == "1")


def valid(key: bytes, origin: str, slots: list[bytes]) -> list[CommitTag]:
    """The valid tags among ``slots``, newest (highest serial) first."""
    tags = [t for t in (unseal(key, origin, s) for s in slots) if t is not None]
    return sorted(tags, key=lambda t: t.serial, reverse=True)


def latest(key: bytes, origin: str, slots: list[bytes]) -> CommitTag | None:
    """The valid tag with the highest serial among ``slots``."""
    tags = valid(key, origin, slots)
    return tags[0] if tags else None
