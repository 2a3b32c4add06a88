"""The ``GWENC1`` envelope: AES-256-GCM over a chunked stream, data key wrapped by a KEK.

Layout (all integers big-endian)::

    stream header (17 bytes, authenticated by every chunk and by the key wrap)
        magic        6  b"GWENC1"
        chunk_size   4  plaintext bytes per chunk (the last chunk may be shorter)
        nonce_prefix 7  random, per artifact
    key section (68 bytes, replaced in place by rewrap)
        kek_id       8  first 8 bytes of SHA-256("gateway-kek-id" || KEK): names the KEK
        wrap_nonce  12  random
        wrapped_dek 48  AES-256-GCM(KEK, wrap_nonce, DEK, aad = stream header || kek_id)
    chunks
        AES-256-GCM(DEK, nonce_prefix || u32 index || final_flag, chunk, aad = stream header)

The chunk nonce follows the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar,
"Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015, the
scheme behind Tink's streaming AEAD): the index makes a dropped or reordered chunk fail
authentication, and the final flag (1 only on the last chunk) makes truncation at a chunk
boundary, or data appended after the end, fail too. An empty plaintext is one empty final
chunk, so every valid stream has at least one chunk.

Only the data key is wrapped by the KEK, so rotating the KEK (``rewrap``) rewrites the 68-byte
key section and never touches the chunks.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import ModelUnavailable

MAGIC = b"GWENC1"
STREAM_HEADER_LEN = 6 + 4 + 7
KEY_SECTION_LEN = 8 + 12 + 48
HEADER_LEN = STREAM_HEADER_LEN + KEY_SECTION_LEN
TAG_LEN = 16
DEFAULT_CHUNK = 1 << 20
# Bounds a reader accepts, so a forged header cannot ask for a huge allocation.
MIN_CHUNK, MAX_CHUNK = 1 << 10, 1 << 26
KEK_LEN = 32


class StreamError(ModelUnavailable):
    """The envelope is malformed, was encrypted under another KEK, or fails authentication."""


def kek_id(kek: bytes) -> bytes:
    """A short public name for a KEK, so "wrong key" is told apart from "tampered"."""
    return hashlib.sha256(b"gateway-kek-id" + kek).digest()[:8]


def _check_kek(kek: bytes) -> None:
    if len(kek) != KEK_LEN:
        raise StreamError(f"a key-encryption key must be {KEK_LEN} bytes, got {len(kek)}")


def _chunk_nonce(prefix: bytes, index: int, final: bool) -> bytes:
    if index >= 1 << 32:
        raise StreamError("stream too long: more than 2**32 chunks")
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def _wrap(kek: bytes, stream_header: bytes, dek: bytes) -> bytes:
    kid = kek_id(kek)
    nonce = os.urandom(12)
    return kid + nonce + AESGCM(kek).encrypt(nonce, dek, stream_header + kid)


def _unwrap(kek: bytes, stream_header: bytes, key_section: bytes) -> bytes:
    _check_kek(kek)
    kid, nonce, wrapped = key_section[:8], key_section[8:20], key_section[20:]
    if kid != kek_id(kek):
        raise StreamError(f"encrypted under key-encryption key {kid.hex()}, "
                          f"not the one given ({kek_id(kek).hex()})")
    try:
        return AESGCM(kek).decrypt(nonce, wrapped, stream_header + kid)
    except InvalidTag as err:
        raise StreamError("the wrapped data key fails authentication (header tampered)") from err


def parse_header(header: bytes) -> tuple[bytes, int, bytes]:
    """Split and check a header: (stream header, chunk size, nonce prefix)."""
    if len(header) < HEADER_LEN or header[:6] != MAGIC:
        raise StreamError("not a gateway encrypted file (bad magic or short header)")
    (chunk_size,) = struct.unpack(">I", header[6:10])
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise StreamError(f"chunk size {chunk_size} out of range")
    return header[:STREAM_HEADER_LEN], chunk_size, header[10:STREAM_HEADER_LEN]


def encrypt_chunks(chunks: Iterable[bytes], kek: bytes, chunk_size: int = DEFAULT_CHUNK
                   ) -> Iterator[bytes]:
    """Yield the header, then one ciphertext per plaintext chunk.

    ``chunks`` must all be exactly ``chunk_size`` long except the last, which may be
    shorter (or empty); the final flag goes on the last one, so we look one chunk ahead.
    """
    _check_kek(kek)
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise StreamError(f"chunk size {chunk_size} out of range")
    prefix = os.urandom(7)
    stream_header = MAGIC + struct.pack(">I", chunk_size) + prefix
    dek = AESGCM.generate_key(bit_length=256)
    yield stream_header + _wrap(kek, stream_header, dek)
    aead = AESGCM(dek)
    index = 0
    pending: bytes | None = None
    for chunk in chunks:
        if pending is not None:
            if len(pending) != chunk_size:
                raise StreamError("only the last chunk may be shorter than the chunk size")
            yield aead.encrypt(_chunk_nonce(prefix, index, False), pending, stream_header)
            index += 1
        pending = chunk
    yield aead.encrypt(_chunk_nonce(prefix, index, True), pending or b"", stream_header)


def decrypt_chunks(header: bytes, bodies: Iterable[bytes | memoryview], kek: bytes
                   ) -> Iterator[bytes]:
    """Yield plaintext chunks from ciphertext chunks of ``chunk_size + 16`` bytes each.

    ``bodies`` yields the ciphertext after the header in pieces of exactly one sealed
    chunk (the last may be shorter); the final flag is expected only on the last.
    """
    stream_header, chunk_size, prefix = parse_header(header)
    aead = AESGCM(_unwrap(kek, stream_header, header[STREAM_HEADER_LEN:HEADER_LEN]))
    sealed_size = chunk_size + TAG_LEN
    index = 0
    pending: bytes | memoryview | None = None
    for body in bodies:
        if pending is not None:
            yield _open(aead, prefix, index, False, pending, stream_header, sealed_size)
            index += 1
        pending = body
    if pending is None:
        raise StreamError("truncated: no chunk after the header")
    yield _open(aead, prefix, index, True, pending, stream_header, sealed_size)


def _open(aead: AESGCM, prefix: bytes, index: int, final: bool, sealed: bytes | memoryview,
          stream_header: bytes, sealed_size: int) -> bytes:
    if len(sealed) < TAG_LEN or len(sealed) > sealed_size or (not final and len(sealed)
                                                                != sealed_size):
        raise StreamError(f"chunk {index} has a bad length {len(sealed)}")
    try:
        return aead.decrypt(_chunk_nonce(prefix, index, final), sealed, stream_header)
    except InvalidTag as err:
        where = "final chunk" if final else "chunk"
        raise StreamError(f"{where} {index} fails authentication (modified, reordered, "
                          f"truncated or extended ciphertext)") from err


def rewrap_header(header: bytes, old_kek: bytes, new_kek: bytes) -> bytes:
    """The same header with the data key re-wrapped under ``new_kek``."""
    stream_header, _, _ = parse_header(header)
    _check_kek(new_kek)
    dek = _unwrap(old_kek, stream_header, header[STREAM_HEADER_LEN:HEADER_LEN])
    return stream_header + _wrap(new_kek, stream_header, dek)
