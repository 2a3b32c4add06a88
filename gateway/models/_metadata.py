"""``metadata.toml``: a model version's owner and labels, its attributes for ABAC policy.

One strict parser for everything that reads it: the repository when it loads a version (a
version whose metadata is invalid is refused) and ``gateway policy diff``/``explain``, which
must see a model's attributes exactly as the server would, or not at all.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from gateway.errors import ModelUnavailable

METADATA_FILE = "metadata.toml"


def parse_metadata(data: bytes | None) -> tuple[str, dict[str, str]]:
    """(owner, labels) from the file's bytes (None: no file, no owner, no labels).

    :raises ModelUnavailable: not UTF-8 TOML, or owner not a string, or labels not a table
        of strings (the server refuses to serve such a version).
    """
    if data is None:
        return "", {}
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ModelUnavailable(f"{METADATA_FILE} is not valid TOML: {err}") from err
    owner = table.get("owner", "")
    labels = table.get("labels", {})
    if not isinstance(owner, str) or not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ModelUnavailable(f"{METADATA_FILE}: owner must be a string and [labels] a table "
                               "of strings")
    return owner, dict(sorted(labels.items()))


def model_attributes(name: str, version: str, owner: str,
                     labels: dict[str, str]) -> dict[str, object]:
    """The ``model.*`` attributes policy conditions see for a served version."""
    return {"model.name": name, "model.version": version, "model.owner": owner,
            **{f"model.labels.{k}": v for k, v in labels.items()}}


def repository_attributes(root: Path) -> list[tuple[str, str, dict[str, object]]]:
    """(name, version, attributes) of each version under a repository root whose metadata the
    server would accept, for tools that evaluate policy as the server would.

    Versions with invalid metadata are left out: the server refuses them, so no decision is
    ever made on their attributes. Only ``metadata.toml`` is read (no signature check): the
    tools compare policies, they do not serve models.
    """
    out: list[tuple[str, str, dict[str, object]]] = []
    if not root.is_dir():
        return out
    for model in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version in sorted(p for p in model.iterdir() if p.is_dir()):
            path = version / METADATA_FILE
            try:
                data = path.read_bytes() if path.is_file() else None
                owner, labels = parse_metadata(data)
            except (OSError, ModelUnavailable):
                continue
            out.append((model.name, version.name,
                        model_attributes(model.name, version.name, owner, labels)))
    return out
