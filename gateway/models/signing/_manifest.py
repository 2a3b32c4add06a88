"""The OMS "files" manifest: safe resource names, per-file SHA-256, and the difference report.

A manifest maps each file's path relative to the model directory (POSIX, ``/``-separated) to
the SHA-256 of its plaintext bytes. Names are checked lexically here, before any path is ever
built from them: a name that is absolute, empty, or has ``.``/``..``/empty components or a
backslash could make a verifier read outside the model or read one file under two names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from gateway.models.signing._errors import SignatureError

#: The signature file's name; it is never part of the manifest it signs.
SIGNATURE_NAME = "model.sig"
ENCRYPTED_SUFFIX = ".enc"
_READ_SIZE = 8 << 20


class ManifestError(SignatureError):
    """A name or file in the model cannot be part of a manifest."""


def check_name(name: object, what: str = "resource name") -> str:
    """Return ``name`` if it is a safe relative POSIX path, else raise :class:`ManifestError`."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{what} {name!r} is not a non-empty string")
    if "\\" in name or "\x00" in name:
        raise ManifestError(f"{what} {name!r} contains a backslash or NUL")
    if name.startswith("/"):
        raise ManifestError(f"{what} {name!r} is absolute")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ManifestError(f"{what} {name!r} has an empty, '.' or '..' component")
    return name


def sort_key(name: str) -> list[str]:
    """Order of resources: by path components, as ``model_signing`` orders PurePosixPath."""
    return name.split("/")


def root_digest(resources: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the concatenated raw digests, in resource order (OMS subject digest)."""
    h = hashlib.sha256()
    for _, digest in resources:
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def digests_of_bytes(files: Mapping[str, bytes]) -> dict[str, str]:
    """Name -> SHA-256 hex for files already in memory (the names are checked too)."""
    return {check_name(name, "file name"): hashlib.sha256(data).hexdigest()
            for name, data in files.items()}


def differences(expected: Mapping[str, str], actual: Mapping[str, str],
                ignored_by_signer: Iterable[str] = ()) -> list[str]:
    """Human lines naming files that are extra, missing or changed (empty if they agree)."""
    ignored = [p for p in ignored_by_signer if p != SIGNATURE_NAME]

    def ignored_note(name: str) -> str:
        covered = any(name == p or name.startswith(p + "/") for p in ignored)
        return " (listed in the signature's ignore_paths)" if covered else ""

    lines = []
    extra = sorted(set(actual) - set(expected), key=sort_key)
    if extra:
        lines.append("unsigned files present (the gateway serves only signed files): "
                     + ", ".join(name + ignored_note(name) for name in extra))
    missing = sorted(set(expected) - set(actual), key=sort_key)
    if missing:
        lines.append("signed files missing: " + ", ".join(missing))
    changed = sorted((n for n in set(expected) & set(actual) if expected[n] != actual[n]),
                     key=sort_key)
    if changed:
        lines.append("files changed since signing: " + ", ".join(changed))
    return lines
