"""C2SP signed notes (c2sp.org/signed-note) with Ed25519 keys, and C2SP tlog checkpoints.

A signed note is UTF-8 text ending in a newline, a blank line, then one line per signature:
``— <key name> base64(key id || signature)``. The key id is the first four bytes of
SHA-256(key name || "\\n" || type byte || public key), and a verifier key is written
``<name>+<key id hex>+base64(type byte || public key)`` (the golang.org/x/mod/sumdb/note
format). Type 0x01 is plain Ed25519 over the text; type 0x04 is c2sp.org/tlog-cosignature
(Ed25519 over "cosignature/v1\\ntime <T>\\n" + text, the signature prefixed by T).

A checkpoint (c2sp.org/tlog-checkpoint) is the note text ``<origin>\\n<size>\\n<base64 root>\\n``
followed by optional non-empty extension lines.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import AuditDataError

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
_SIG_PREFIX = "— "  # EM DASH, space
_MAX_SIGNATURES = 100
_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_SIZE = re.compile(r"^(0|[1-9][0-9]{0,19})$")


class NoteError(AuditDataError, ValueError):
    """A note, key or checkpoint is malformed or does not verify; the message says which."""


def _b64decode(text: str, what: str) -> bytes:
    if len(text) % 4 or not _B64.match(text):
        raise NoteError(f"{what} is not standard padded base64")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise NoteError(f"{what} is not standard padded base64") from None


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name) or not name.isprintable():
        raise NoteError(f"key name {name!r} is empty or has a space, '+' or control character")


def key_id(name: str, key: bytes) -> bytes:
    """The 4-byte key id: SHA-256(name || "\\n" || type || public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + key).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    """A parsed verifier key (``name+keyid+base64``)."""

    name: str
    id: bytes
    alg: int
    public_key: Ed25519PublicKey

    def verify(self, text: bytes, sig: bytes) -> bool:
        try:
            if self.alg == ALG_ED25519:
                self.public_key.verify(sig, text)
            else:
                if len(sig) != 72:
                    return False
                (ts,) = struct.unpack(">Q", sig[:8])
                msg = b"cosignature/v1\ntime %d\n" % ts + text
                self.public_key.verify(sig[8:], msg)
        except InvalidSignature:
            return False
        return True


def parse_vkey(vkey: str) -> Verifier:
    """Parse a verifier key, checking the name, algorithm, key length and key id."""
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteError("verifier key must be <name>+<key id>+<base64 key>")
    name, hex_id, b64 = parts
    _check_name(name)
    if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
        raise NoteError("verifier key id must be 8 lower-case hex digits")
    key = _b64decode(b64, "verifier key")
    if len(key) != 33 or key[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1):
        raise NoteError("verifier key is not an Ed25519 (type 0x01 or 0x04) key")
    if key_id(name, key) != bytes.fromhex(hex_id):
        raise NoteError("verifier key id does not match its name and key")
    public = Ed25519PublicKey.from_public_bytes(key[1:])
    return Verifier(name, bytes.fromhex(hex_id), key[0], public)


@dataclass(frozen=True)
class Signer:
    """An Ed25519 note signing key; ``vkey`` is its verifier key."""

    name: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> Signer:
        _check_name(name)
        return cls(name, Ed25519PrivateKey.generate())

    @property
    def _public(self) -> bytes:
        return bytes([ALG_ED25519]) + self.private_key.public_key().public_bytes_raw()

    @property
    def id(self) -> bytes:
        return key_id(self.name, self._public)

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.id.hex()}+{base64.b64encode(self._public).decode()}"

    @property
    def skey(self) -> str:
        seed = bytes([ALG_ED25519]) + self.private_key.private_bytes_raw()
        return f"PRIVATE+KEY+{self.name}+{self.id.hex()}+{base64.b64encode(seed).decode()}"

    def sign(self, text: str) -> str:
        """The signed note: ``text``, a blank line, and this key's signature line."""
        _check_text(text)
        sig = self.private_key.sign(text.encode())
        return f"{text}\n{_SIG_PREFIX}{self.name} {base64.b64encode(self.id + sig).decode()}\n"


def parse_skey(skey: str) -> Signer:
    """Parse ``PRIVATE+KEY+<name>+<key id>+base64(0x01 || seed)``."""
    parts = skey.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise NoteError("signing key must be PRIVATE+KEY+<name>+<key id>+<base64 key>")
    name, hex_id, b64 = parts[2:]
    _check_name(name)
    raw = _b64decode(b64, "signing key")
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise NoteError("signing key is not an Ed25519 key")
    signer = Signer(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
    if signer.id.hex() != hex_id:
        raise NoteError("signing key id does not match its name and key")
    return signer


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if any(c < " " and c != "\n" for c in text):
        raise NoteError("note text contains a control character")


@dataclass(frozen=True)
class Note:
    """An opened note: its text and the names of the keys whose signatures verified."""

    text: str
    verified: tuple[str, ...]
    unverified: tuple[str, ...]


def open_note(msg: bytes | str, verifiers: list[Verifier]) -> Note:
    """Parse and verify a signed note; at least one known key must have signed it.

    Signatures by unknown keys are ignored (they may be witnesses' cosignatures); a
    signature by a known key that does not verify, or a key named twice among the
    verifiers that signed, is an error.
    """
    if isinstance(msg, bytes):
        try:
            msg = msg.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("note is not valid UTF-8") from None
    split = msg.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no signature block (no blank line)")
    text, sigs = msg[:split + 1], msg[split + 2:]
    _check_text(text)
    if not sigs.endswith("\n"):
        raise NoteError("note signature block must end with a newline")
    lines = sigs[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise NoteError(f"note has more than {_MAX_SIGNATURES} signatures")
    by_id: dict[tuple[str, bytes], list[Verifier]] = {}
    for v in verifiers:
        by_id.setdefault((v.name, v.id), []).append(v)
    verified: list[str] = []
    unverified: list[str] = []
    seen: set[tuple[str, bytes]] = set()
    body = text.encode()
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise NoteError(f"note signature line {line[:40]!r} does not start with '— '")
        name, _, b64 = line[len(_SIG_PREFIX):].partition(" ")
        _check_name(name)
        raw = _b64decode(b64, "signature")
        if len(raw) < 5:
            raise NoteError("signature is too short")
        kid = (name, raw[:4])
        known = by_id.get(kid)
        if not known:
            unverified.append(name)
            continue
        if len(known) > 1:
            raise NoteError(f"verifier key {name} is given more than once")
        if kid in seen:
            continue
        seen.add(kid)
        if not known[0].verify(body, raw[4:]):
            raise NoteError(f"invalid signature by key {name}")
        verified.append(name)
    if not verified:
        raise NoteError("note is not signed by any known key")
    return Note(text, tuple(verified), tuple(unverified))


@dataclass(frozen=True)
class Checkpoint:
    """A parsed c2sp.org/tlog-checkpoint body."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        ext = "".join(f"{e}\n" for e in self.extensions)
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n{ext}"


def parse_checkpoint(text: str, hash_len: int | None = 32) -> Checkpoint:
    """Parse a checkpoint body strictly (decimal size, padded base64 root, non-empty extensions)."""
    if not text.endswith("\n"):
        raise NoteError("checkpoint must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("checkpoint needs origin, size and root hash lines")
    origin, size, root_b64, *ext = lines
    if not origin or "\r" in text:
        raise NoteError("checkpoint origin line is empty or has a carriage return")
    if not _SIZE.match(size) or int(size) >= 2**64:
        raise NoteError(f"checkpoint size {size!r} is not a decimal 64-bit integer")
    root = _b64decode(root_b64, "checkpoint root hash")
    if hash_len is not None and len(root) != hash_len:
        raise NoteError(f"checkpoint root hash has {len(root)} bytes, expected {hash_len}")
    if any(not e for e in ext):
        raise NoteError("checkpoint extension lines must not be empty")
    return Checkpoint(origin, int(size), root, tuple(ext))


def open_checkpoint(note: bytes | str, verifier: Verifier, origin: str,
                    others: Sequence[Verifier] = ()) -> tuple[Checkpoint, Note]:
    """Verify a signed checkpoint: signed by the log's key, for the expected origin."""
    opened = open_note(note, [verifier, *others])
    if verifier.name not in opened.verified:
        raise NoteError(f"checkpoint is not signed by the log key {verifier.name}")
    cp = parse_checkpoint(opened.text)
    if cp.origin != origin:
        raise NoteError(f"checkpoint origin {cp.origin!r} is not the log's origin {origin!r}")
    return cp, opened
