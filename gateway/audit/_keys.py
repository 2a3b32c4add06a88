"""The log's secrets: the Ed25519 checkpoint signing key, the payload HMAC key and the commit
tag key.

All are written once (mode 0600, by ``gateway audit keygen`` or ``gateway demo init``) and
only read afterwards. The verifier key is written beside them, world-readable, for auditors.
The commit tag key (see ``_tags.py``) lives beside the signing key as ``commit.key``; a log
opened without one gets a new one, which proves nothing about records written before it (so
records that only an old tag covered are refused, never adopted).
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


def commit_key_path(signing_key: Path) -> Path:
    """Where the commit tag HMAC key of the log signed by ``signing_key`` is kept."""
    return signing_key.with_name("commit.key")


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
    _write_new(payload_key, _new_hmac_key(), 0o600)
    _write_new(commit_key_path(signing_key), _new_hmac_key(), 0o600)
    return signer


def _new_hmac_key() -> str:
    return base64.b64encode(secrets.token_bytes(_HMAC_KEY_BYTES)).decode() + "\n"


def ensure_commit_key(signing_key: Path) -> None:
    """Create the commit tag key beside ``signing_key`` if absent (logs made before tags)."""
    path = commit_key_path(signing_key)
    if not path.exists():
        _write_new(path, _new_hmac_key(), 0o600)


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


def load_hmac_key(path: Path, what: str = "payload") -> bytes:
    """An HMAC key (base64): the payload key, or with ``what="commit tag"`` the commit key."""
    try:
        key = base64.b64decode(path.read_text(encoding="ascii").strip(), validate=True)
    except FileNotFoundError:
        raise ConfigError(f"no audit {what} HMAC key at {path}; run `gateway audit keygen` "
                          "(or `gateway demo init`)") from None
    except (OSError, UnicodeDecodeError, binascii.Error) as err:
        raise ConfigError(f"cannot read audit {what} key {path}: {err}") from None
    if len(key) < 16:
        raise ConfigError(f"{path}: {what} HMAC key is shorter than 16 bytes")
    return key
