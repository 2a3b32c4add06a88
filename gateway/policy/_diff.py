"""``gateway policy diff``: who gains or loses which access between two policy revisions.

Evaluates both revisions exhaustively (:meth:`Snapshot.evaluate`) over every subject, action
and model they name, with the model attributes the repository gives.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.policy._condition import Attributes
from gateway.policy._engine import Decision, Snapshot
from gateway.policy._source import parse_files, read_directory
from gateway.policy._spec import ACTIONS, GATEWAY_OBJECT, MODEL_FILE, POLICY_FILE, PolicyError


@dataclass(frozen=True, slots=True)
class Change:
    """One (subject, model[:version], action) whose access differs between two policies."""

    subject: str
    model: str
    version: str | None
    action: str
    old: Decision
    new: Decision

    @property
    def gained(self) -> bool:
        return self.new.allowed

    def to_dict(self) -> dict[str, object]:
        return {"change": "gained" if self.gained else "lost", "subject": self.subject,
                "model": self.model, "version": self.version, "action": self.action,
                "old_rule": self.old.rule, "new_rule": self.new.rule}

    def __str__(self) -> str:
        obj = self.model + (f":{self.version}" if self.version else "")
        sign = "+" if self.gained else "-"
        return (f"{sign} {self.subject} {self.action} {obj}  "
                f"(was {self.old.rule}, now {self.new.rule})")


def load_revision(ref: str, path: str = "policies", cwd: Path | None = None) -> dict[str, bytes]:
    """The policy files of directory ``ref`` or, if it is not one, of git revision ``ref``."""
    if Path(ref).is_dir():
        return read_directory(Path(ref))
    files = {}
    for name in (MODEL_FILE, POLICY_FILE):
        spec = f"{ref}:./{path.strip('/')}/{name}"
        try:
            done = subprocess.run(["git", "show", spec], cwd=cwd, capture_output=True,
                                  check=False, timeout=30)
        except OSError as err:
            raise PolicyError(f"{ref}: not a directory, and git is unavailable: {err}") from None
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            raise PolicyError(f"{ref}: neither a directory nor a git revision holding "
                              f"{path}/{name} ({message[-1] if message else 'git failed'})")
        files[name] = done.stdout
    return files


def compile_files(files: dict[str, bytes]) -> Snapshot:
    """Compile policy file contents (no test cases: diff compares what is written)."""
    return Snapshot(parse_files(files))


def access_diff(old: Snapshot, new: Snapshot, *, models: Iterable[str] = frozenset(),
                subjects: Iterable[str] = frozenset(),
                attributes: Attributes | None = None,
                instances: Sequence[tuple[str, str, dict[str, object]]] = ()) -> list[Change]:
    """Every (subject or role, model, action) whose decision differs between the policies.

    The universe: every subject and role either policy names (plus ``subjects``), every model
    name either names exactly (plus ``models``), each wildcard pattern as a stand-in name for
    "a model matching it", the gateway object, each version either names, and every action.
    A model in ``instances`` (the repository) is compared per version instead, with its own
    attributes (owner, labels), as the server would decide it.
    """
    names = old.subjects() | new.subjects() | set(subjects)
    objects = {GATEWAY_OBJECT, *models}
    in_repository = {model for model, _, _ in instances}
    versions: set[str | None] = {None}
    for snap in (old, new):
        for spec in snap.source.rules:
            objects.add(spec.name.exact if spec.name.exact is not None else spec.name.source)
            if spec.version is not None:
                versions.add(spec.version.source)
    objects -= in_repository  # those are compared per version, with their own labels, below
    base = dict(attributes or {})
    changes = []
    for subject in sorted(names):
        for model in sorted(objects):
            for version in sorted(versions, key=lambda v: (v is not None, v or "")):
                attrs = dict(base)
                if version is not None:
                    attrs["model.version"] = version
                for action in ACTIONS:
                    a = old.decide(subject, model, action, attrs)
                    b = new.decide(subject, model, action, attrs)
                    if a.allowed != b.allowed:
                        changes.append(Change(subject, model, version, action, a, b))
    seen = {(c.subject, c.model, c.version, c.action) for c in changes}
    for subject in sorted(names):
        for model, version, own in instances:
            attrs = {**base, **own}
            for action in ACTIONS:
                if (subject, model, version, action) in seen:
                    continue
                a = old.decide(subject, model, action, attrs)
                b = new.decide(subject, model, action, attrs)
                if a.allowed != b.allowed:
                    changes.append(Change(subject, model, version, action, a, b))
    return _drop_version_echoes(changes)


def _drop_version_echoes(changes: list[Change]) -> list[Change]:
    """A change that holds for every version is reported once, without a version."""
    unversioned = {(c.subject, c.model, c.action, c.gained) for c in changes if c.version is None}
    return [c for c in changes
            if c.version is None or (c.subject, c.model, c.action, c.gained) not in unversioned]


def conditional_changes(old: Snapshot, new: Snapshot) -> tuple[list[str], list[str]]:
    """Conditional rules only in the old / only in the new policy (their effect depends on
    request attributes, so the access table alone cannot show it)."""
    def texts(snap: Snapshot) -> set[str]:
        model = snap.source.model
        return {spec.text(model) for spec in snap.source.rules if spec.cond is not None}

    a, b = texts(old), texts(new)
    return sorted(a - b), sorted(b - a)
