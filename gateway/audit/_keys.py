"""The log's two secrets: the Ed25519 checkpoint signing key and the payload HMAC key.

Both are written once (mode 0600, by ``gateway audit keygen`` or ``gateway demo init``) and
only read afterwards. The verifier key is written beside them, world-readable, for auditors.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from pathlib import Path

from gateway._atomic import private_dir, write_atomic
from gateway.audit._note import NoteError, Signer, parse_skey
from gateway.errors import ConfigError

_HMAC_KEY_BYTES = 32


def vkey_path(signing_key: Path) -> Path:
    """Where the public verifier key of ``signing_key`` is written."""
    return signing_key.with_suffix(".vkey")


def _write_new(path: Path, text: str, mode: int) -> None:
    private_dir(path.parent)
    write_atomic(path, text.encode(), mode=mode)


def generate(signing_key: Path, payload_key: Path, name: str, *, force: bool = False) -> Signer:
    """Create both keys (refusing to overwrite unless ``force``); returns the signer."""
    if not force:
        for p in (signing_key, payload_key):
            if p.exists():
                raise ConfigError(f"{p} already exists; refusing to overwrite an audit key "
                                  "(a new signing key starts a log no old checkpoint verifies)")
    try:
        signer = Signer.generate(name)
    except NoteError as err:
        raise ConfigError(f"audit log name: {err}") from None
    _write_new(signing_key, signer.skey + "\n", 0o600)
    _write_new(vkey_path(signing_key), signer.vkey + "\n", 0o644)
    _write_new(payload_key, base64.b64encode(secrets.token_bytes(_HMAC_KEY_BYTES)).decode() + "\n",
               0o600)
    return signer


def load_signer(path: Path) -> Signer:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"no audit signing key at {path}; run `gateway audit keygen` "
                          "(or `gateway demo init`)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read audit signing key {path}: {err}") from None
    try:
        return parse_skey(text)
    except NoteError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_payload_key(path: Path) -> bytes:
    try:
        key = base64.b64decode(path.read_text(encoding="ascii").strip(), validate=True)
    except FileNotFoundError:
        raise ConfigError(f"no audit payload HMAC key at {path}; run `gateway audit keygen` "
                          "(or `gateway demo init`)") from None
    except (OSError, UnicodeDecodeError, binascii.Error) as err:
        raise ConfigError(f"cannot read audit payload key {path}: {err}") from None
    if len(key) < 16:
        raise ConfigError(f"{path}: payload HMAC key is shorter than 16 bytes")
    return key
