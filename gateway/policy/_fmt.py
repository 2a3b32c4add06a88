"""``gateway policy fmt``: the canonical text of a policy, which loads to the same policy."""

from __future__ import annotations

import io
import re
from pathlib import Path

from gateway._atomic import write_atomic
from gateway.policy._model_conf import parse_model
from gateway.policy._policy_csv import split_fields
from gateway.policy._source import parse_files, read_directory
from gateway.policy._spec import MODEL_FILE, POLICY_FILE, PolicyError, PolicySource, Problem


def format_directory(directory: Path) -> dict[str, str]:
    """The canonical text of model.conf and policy.csv (validated first: never formats a
    policy that does not load, so fmt cannot change meaning silently)."""
    files = read_directory(directory)
    source = parse_files(files)
    model_text = files[MODEL_FILE].decode("utf-8")
    policy_text = files[POLICY_FILE].decode("utf-8")
    return {MODEL_FILE: _format_model(model_text),
            POLICY_FILE: _format_policy(policy_text, source)}


def _format_model(text: str) -> str:
    out: list[str] = []
    continuing = False
    for raw in text.splitlines():
        line = raw.strip()
        if continuing:  # a value continued with '\' stays as written
            out.append("    " + line)
            continuing = line.endswith("\\")
            continue
        if line.startswith("[") and out and out[-1] != "":
            out.append("")
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if line.startswith(("#", ";", "[")):
            out.append(line)
            continue
        key, _, value = line.partition("=")
        value = re.sub(r"[ \t]+", " ", value.strip())
        out.append(f"{key.strip()} = {value}")
        continuing = value.endswith("\\")
    problems: list[Problem] = []
    if parse_model("\n".join(out), problems) is None:  # pragma: no cover - guarded above
        raise PolicyError(problems)
    return "\n".join(out).strip("\n") + "\n"


def _format_policy(text: str, source: PolicySource) -> str:
    by_line = {spec.line: spec for spec in source.rules}
    links = {link.line: link for link in source.links}
    out: list[str] = []
    for number, raw in enumerate(io.BytesIO(text.encode()), 1):  # numbered as parse_policy
        line = raw.decode().strip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if line.startswith("#"):
            out.append(line)
        elif number in by_line:
            out.append(by_line[number].text(source.model))
        elif number in links:
            out.append(f"g, {links[number].member}, {links[number].role}")
        else:  # pragma: no cover - parse_files accepted every other line
            out.append(", ".join(split_fields(line)))
    return "\n".join(out).strip("\n") + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a watcher never reads a half-written file."""
    write_atomic(path, text.encode("utf-8"), mode=path.stat().st_mode & 0o777)
