"""`gateway model encrypt|decrypt|rewrap|kekgen`: encryption at rest for model files.

    gateway model kekgen keys/kek.hex
    gateway model encrypt models/iris/1 --kek-file keys/kek.hex     # X -> X.enc, X removed
    gateway model rewrap models/iris/1 --kek-file keys/kek.hex --new-kek-file keys/kek2.hex
    gateway model decrypt models/iris/1 --kek-file keys/kek2.hex    # X.enc -> X (operators only)

A directory means every file in it except ``model.sig`` and ``metadata.toml`` (kept readable
for tooling). Sign before or after encrypting: the signature covers the plaintext either way.
``--json`` prints one JSON object for scripts; progress bars go to stderr on a terminal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.cli._model_signing import run_json
from gateway.errors import GatewayError

#: Files left in plaintext when a whole directory is encrypted.
_NEVER_ENCRYPTED = ("model.sig", "metadata.toml")


def register(verbs: argparse._SubParsersAction) -> None:
    """Add ``encrypt``, ``decrypt``, ``rewrap`` and ``kekgen`` to the `model` group."""
    enc = verbs.add_parser("encrypt", help="encrypt model files (AES-256-GCM envelope)")
    _paths_and_kek(enc)
    enc.add_argument("--keep", action="store_true", help="keep the plaintext files")
    enc.set_defaults(func=_encrypt)

    dec = verbs.add_parser("decrypt", help="decrypt *.enc model files to disk")
    _paths_and_kek(dec)
    dec.add_argument("--keep", action="store_true", help="keep the encrypted files")
    dec.set_defaults(func=_decrypt)

    rew = verbs.add_parser("rewrap", help="re-wrap data keys under a new key-encryption key")
    _paths_and_kek(rew)
    new = rew.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-kek-file", type=Path, help="the new key-encryption key file")
    new.add_argument("--new-kek-env", help="environment variable holding the new KEK")
    rew.set_defaults(func=_rewrap)

    gen = verbs.add_parser("kekgen", help="create a new random key-encryption key file (0600)")
    gen.add_argument("path", type=Path, metavar="FILE")
    gen.add_argument("--json", action="store_true", help="print a JSON result for scripts")
    gen.set_defaults(func=_kekgen)


def _paths_and_kek(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="files, or model directories")
    kek = parser.add_mutually_exclusive_group(required=True)
    kek.add_argument("--kek-file", type=Path, help="key-encryption key file")
    kek.add_argument("--kek-env", help="environment variable holding the key-encryption key")
    parser.add_argument("--json", action="store_true", help="print a JSON result for scripts")


def _files(paths: list[Path], encrypted: bool) -> list[Path]:
    """Expand directories to the files an operation applies to, sorted; refuse symlinks."""
    out: list[Path] = []
    for path in paths:
        if path.is_symlink():
            raise GatewayError(f"{path}: symbolic links are refused")
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_symlink():
                    raise GatewayError(f"{child}: symbolic links are refused")
                if (child.is_file() and child.name.endswith(".enc") == encrypted
                        and child.name not in _NEVER_ENCRYPTED):
                    out.append(child)
        elif path.is_file():
            out.append(path)
        else:
            raise GatewayError(f"{path}: no such file or directory")
    return out


def _load(args: argparse.Namespace, new: bool = False) -> bytes:
    from gateway.models.encryption import load_kek, require_kek

    if new:
        return require_kek(load_kek(file=args.new_kek_file, env=args.new_kek_env or ""))
    return require_kek(load_kek(file=args.kek_file, env=args.kek_env or ""))


def _progress(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


def _encrypt(args: argparse.Namespace) -> int:
    from gateway.models.encryption import encrypt_file, kek_fingerprint

    def action() -> tuple[dict, str]:
        kek = _load(args)
        done = [str(encrypt_file(p, kek, keep=args.keep, progress=_progress(args)))
                for p in _files(args.paths, encrypted=False)]
        return ({"encrypted": done, "kek": kek_fingerprint(kek)},
                "\n".join(f"encrypted {p}" for p in done) or "nothing to encrypt")

    return run_json(args, action)


def _decrypt(args: argparse.Namespace) -> int:
    from gateway.models.encryption import decrypt_file

    def action() -> tuple[dict, str]:
        kek = _load(args)
        done = [str(decrypt_file(p, kek, keep=args.keep, progress=_progress(args)))
                for p in _files(args.paths, encrypted=True)]
        return {"decrypted": done}, "\n".join(f"decrypted {p}" for p in done) or "nothing to do"

    return run_json(args, action)


def _rewrap(args: argparse.Namespace) -> int:
    from gateway.models.encryption import kek_fingerprint, rewrap_file

    def action() -> tuple[dict, str]:
        old, new = _load(args), _load(args, new=True)
        files = _files(args.paths, encrypted=True)
        for path in files:
            rewrap_file(path, old, new)
        done = [str(p) for p in files]
        return ({"rewrapped": done, "kek": kek_fingerprint(new)},
                "\n".join(f"rewrapped {p}" for p in done) or "nothing to rewrap")

    return run_json(args, action)


def _kekgen(args: argparse.Namespace) -> int:
    from gateway.models.encryption import generate_kek, kek_fingerprint, load_kek, require_kek

    def action() -> tuple[dict, str]:
        path = generate_kek(args.path)
        fingerprint = kek_fingerprint(require_kek(load_kek(file=path)))
        return ({"kek_file": str(path), "kek": fingerprint},
                f"wrote {path} (key-encryption key {fingerprint}); keep it away from the models")

    return run_json(args, action)
