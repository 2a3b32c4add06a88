"""Encryption at rest for model files: AES-256-GCM envelope encryption, decrypted in memory.

    from gateway.models.encryption import load_kek, encrypt_file, decrypt_bytes
    kek = load_kek(config.signing)     # [signing] kek_file/kek_env; None if neither is set
    encrypt_file(Path("models/m/1/model.onnx"), kek)     # -> model.onnx.enc, plaintext removed
    plaintext = decrypt_bytes(Path("models/m/1/model.onnx.enc").read_bytes(), kek)

Each artifact gets its own random 256-bit data key (DEK); the DEK is wrapped by the
key-encryption key (KEK), which lives in a file or an environment variable, never beside the
model. ``rewrap_file`` rotates the KEK by re-wrapping only the DEK. Large files are sealed in
authenticated chunks whose nonce carries the chunk index and a final flag, so a flipped byte,
a dropped, reordered or appended chunk and a truncation all fail (format: ``_stream``).

How this composes with signing: the OMS signature (``model.sig``) names and hashes the
PLAINTEXT file (``model.onnx``, not ``model.onnx.enc``). The gateway decrypts ``X.enc`` into
memory, then verifies the signature over the plaintext bytes, then loads those same bytes. GCM
authenticates the ciphertext (integrity under the KEK holder); the signature authenticates
the model (who made it). Encrypting or rewrapping therefore never invalidates a signature.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn

from gateway._atomic import fsync_dir, write_atomic
from gateway.errors import ConfigError, ModelUnavailable
from gateway.models._files import FileData
from gateway.models.encryption import _stream

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "ENCRYPTED_SUFFIX",
    "EncryptionError",
    "decrypt_bytes",
    "decrypt_file",
    "encrypt_file",
    "generate_kek",
    "is_encrypted",
    "iter_decrypt_file",
    "kek_fingerprint",
    "load_kek",
    "require_kek",
    "rewrap_file",
]

#: Suffix of an encrypted file; the plaintext name is the name without it.
ENCRYPTED_SUFFIX = ".enc"


class EncryptionError(ModelUnavailable):
    """A ciphertext failed to decrypt (wrong KEK, tampered, truncated) or could not be written."""


def kek_fingerprint(kek: bytes) -> str:
    """Public hex name of a KEK (what encrypted headers record), for logs and errors."""
    return _stream.kek_id(kek).hex()


def is_encrypted(blob: bytes) -> bool:
    """True if ``blob`` starts like a gateway encrypted file."""
    return blob[:len(_stream.MAGIC)] == _stream.MAGIC


def _decode_kek(text: bytes, where: str) -> bytes:
    if len(text) == _stream.KEK_LEN:
        return text  # raw bytes (hex and base64 forms are 64 and 44 characters long)
    stripped = text.strip()
    if len(stripped) == 2 * _stream.KEK_LEN:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(stripped.decode("ascii", "replace"))
    with contextlib.suppress(binascii.Error, ValueError):
        raw = base64.b64decode(stripped, validate=True)
        if len(raw) == _stream.KEK_LEN:
            return raw
    raise ConfigError(f"{where}: a key-encryption key must be {_stream.KEK_LEN} bytes, given as "
                      f"64 hex characters or base64 (make one with `gateway model kekgen`)")


def load_kek(settings: object | None = None, *, file: Path | None = None, env: str = ""
             ) -> bytes | None:
    """The KEK from a file (must not be accessible by group/others) or an environment variable.

    Pass the ``[signing]`` settings (their ``kek_file``/``kek_env`` are used) or ``file``/
    ``env`` directly; the file wins when both are set. Returns None when no source is
    configured at all (encrypted models are then refused at load, naming the missing key); a
    configured source that is missing or malformed is a :class:`ConfigError` naming it.
    """
    if settings is not None:
        file = getattr(settings, "kek_file", None)
        env = getattr(settings, "kek_env", "") or ""
    if file is not None:
        try:
            mode = file.stat().st_mode
            if mode & 0o077:
                raise ConfigError(f"{file}: key-encryption key file is accessible by group or "
                                  f"others (mode {mode & 0o777:o}); chmod 600 it")
            return _decode_kek(file.read_bytes(), str(file))
        except OSError as err:
            raise ConfigError(f"{file}: cannot read key-encryption key: {err.strerror}") from err
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"environment variable {env} (key-encryption key) is not set")
        return _decode_kek(value.encode(), f"environment variable {env}")
    return None


def require_kek(kek: bytes | None) -> bytes:
    """``kek``, or a :class:`ConfigError` saying how to configure one."""
    if kek is None:
        raise ConfigError("no key-encryption key configured: set [signing] kek_file or "
                          "kek_env, or pass --kek-file/--kek-env")
    return kek


def generate_kek(path: Path) -> Path:
    """Write a new random 256-bit KEK as hex to ``path`` (mode 0600); refuse to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key") from err
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(_stream.KEK_LEN) + "\n")
        out.flush()
        os.fsync(out.fileno())
    return path


def decrypt_bytes(blob: FileData, kek: bytes) -> bytes:
    """Decrypt a whole encrypted file held in memory; nothing touches the disk."""
    view = memoryview(blob)
    try:
        header = bytes(view[:_stream.HEADER_LEN])
        _, chunk_size, _ = _stream.parse_header(header)
        sealed = chunk_size + _stream.TAG_LEN
        body = view[_stream.HEADER_LEN:]
        pieces = (body[i:i + sealed] for i in range(0, len(body), sealed))
        return b"".join(_stream.decrypt_chunks(header, pieces, kek))
    except _stream.StreamError as err:
        raise EncryptionError(f"cannot decrypt: {err}") from err


def _read_exact(src: BinaryIO, size: int) -> Iterator[bytes]:
    while True:
        piece = src.read(size)
        if not piece:
            return
        yield piece


def iter_decrypt_file(path: Path, kek: bytes) -> Iterator[bytes]:
    """Yield the plaintext of encrypted file ``path`` chunk by chunk (streamed, never written)."""
    try:
        with open(path, "rb") as src:
            header = src.read(_stream.HEADER_LEN)
            _, chunk_size, _ = _stream.parse_header(header)
            yield from _stream.decrypt_chunks(
                header, _read_exact(src, chunk_size + _stream.TAG_LEN), kek)
    except _stream.StreamError as err:
        raise EncryptionError(f"{path}: cannot decrypt: {err}") from err


def _progress(total: int, label: str, enabled: bool) -> tqdm[NoReturn] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                leave=False)


def encrypt_file(path: Path, kek: bytes, *, keep: bool = False, progress: bool = False,
                 chunk_size: int = _stream.DEFAULT_CHUNK) -> Path:
    """Encrypt ``path`` to ``path.enc`` (atomic, fsync'd); remove the plaintext unless ``keep``."""
    if path.is_symlink() or not path.is_file():
        raise EncryptionError(f"{path}: not a regular file")
    if path.name.endswith(ENCRYPTED_SUFFIX):
        raise EncryptionError(f"{path}: already encrypted")
    target = path.with_name(path.name + ENCRYPTED_SUFFIX)
    bar = _progress(path.stat().st_size, f"encrypt {path.name}", progress)
    try:
        with open(path, "rb") as src:
            plain = _read_exact(src, chunk_size)
            sealed = _stream.encrypt_chunks(_counted(plain, bar), kek, chunk_size)
            write_atomic(target, sealed, mode=0o600)
    except _stream.StreamError as err:
        raise EncryptionError(f"{path}: cannot encrypt: {err}") from err
    finally:
        if bar is not None:
            bar.close()
    return _replaced(path, target, keep)


def _replaced(path: Path, target: Path, keep: bool) -> Path:
    """Remove ``path`` (durably) now that ``target`` holds its content, unless ``keep``."""
    if not keep:
        path.unlink()
        fsync_dir(path.parent)
    return target


def _counted(pieces: Iterator[bytes], bar: tqdm[NoReturn] | None) -> Iterator[bytes]:
    for piece in pieces:
        if bar is not None:
            bar.update(len(piece))
        yield piece


def decrypt_file(path: Path, kek: bytes, *, keep: bool = False, progress: bool = False) -> Path:
    """Decrypt ``X.enc`` to ``X`` on disk (an operator tool: the gateway never does this)."""
    if not path.name.endswith(ENCRYPTED_SUFFIX) or path.is_symlink() or not path.is_file():
        raise EncryptionError(f"{path}: not an encrypted regular file (*{ENCRYPTED_SUFFIX})")
    target = path.with_name(path.name[: -len(ENCRYPTED_SUFFIX)])
    if target.exists():
        raise EncryptionError(f"{target} already exists; refusing to overwrite it")
    bar = _progress(path.stat().st_size, f"decrypt {path.name}", progress)
    try:
        write_atomic(target, _counted(iter_decrypt_file(path, kek), bar), mode=0o600)
    finally:
        if bar is not None:
            bar.close()
    return _replaced(path, target, keep)


def rewrap_file(path: Path, old_kek: bytes, new_kek: bytes) -> None:
    """Re-wrap the data key of ``path`` under ``new_kek``: only the 68-byte key section changes.

    The section is rewritten in place with one write inside the first disk sector, then
    fsync'd, so the file holds either the old or the new wrapping, never a mix.
    """
    try:
        with open(path, "r+b") as f:
            header = f.read(_stream.HEADER_LEN)
            new_header = _stream.rewrap_header(header, old_kek, new_kek)
            f.seek(_stream.STREAM_HEADER_LEN)
            f.write(new_header[_stream.STREAM_HEADER_LEN:])
            f.flush()
            os.fsync(f.fileno())
    except _stream.StreamError as err:
        raise EncryptionError(f"{path}: cannot rewrap: {err}") from err
    except OSError as err:
        raise EncryptionError(f"{path}: cannot rewrap: {err.strerror}") from err
