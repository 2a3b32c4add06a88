"""The security team's toolchain behind ``gateway policy explain|diff|fmt``.

These run on the slow, exhaustive path (:meth:`Snapshot.evaluate`) so they can say *why*;
the request path never calls them.
"""

from __future__ import annotations

import io
import re
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway._atomic import write_atomic
from gateway.policy._condition import Attributes
from gateway.policy._engine import Decision, Snapshot
from gateway.policy._source import (
    ACTIONS,
    GATEWAY_OBJECT,
    MODEL_FILE,
    POLICY_FILE,
    LinkSpec,
    PolicyError,
    Problem,
    RuleSpec,
    parse_files,
    parse_model,
    read_directory,
    split_fields,
)

# --- explain ----------------------------------------------------------------------------


def _policy_where(where: str) -> str:
    return where


@dataclass(slots=True)
class Explanation:
    """Why a request is allowed or denied."""

    decision: Decision
    deciding: RuleSpec | None
    role_path: list[LinkSpec]
    overridden: list[RuleSpec] = field(default_factory=list)       # allows beaten by a deny
    nearest: list[tuple[RuleSpec, list[str]]] = field(default_factory=list)
    #: Every rule with the reasons it does not match ([]: it matches), in file order.
    trace: list[tuple[RuleSpec, list[str]]] = field(default_factory=list)

    def to_dict(self, snapshot: Snapshot, subject: str,
                where: Callable[[str], str] = _policy_where) -> dict[str, object]:
        """The explanation as data (``--json``); ``where`` renders ``policy.csv:N``
        locations (the CLI makes them relative to the working directory)."""
        model = snapshot.source.model

        def rule(spec: RuleSpec) -> dict[str, object]:
            return {"where": where(spec.where), "rule": spec.text(model)}

        d = self.decision
        return {
            "decision": "allow" if d.allowed else "deny",
            "rule": where(d.rule) if d.rule.startswith(POLICY_FILE) else d.rule,
            "policy_digest": d.policy_digest,
            "subject": subject,
            "roles": list(snapshot.roles_of(subject)[1:]),
            "deciding": rule(self.deciding) if self.deciding is not None else None,
            "role_path": [{"role": link.role, "where": where(link.where)}
                          for link in self.role_path],
            "overridden": [rule(spec) for spec in self.overridden],
            "nearest": [{**rule(spec), "differs": why} for spec, why in self.nearest],
            "trace": [{**rule(spec), "effect": "deny" if spec.deny else "allow",
                       "matches": not why, "differs": why} for spec, why in self.trace],
        }

    def render(self, snapshot: Snapshot, subject: str,
               where: Callable[[str], str] = _policy_where, *, trace: bool = False) -> str:
        data = self.to_dict(snapshot, subject, where)
        lines = [f"decision: {str(data['decision']).upper()} by {data['rule']} "
                 f"(policy {self.decision.policy_digest[:16]})"]
        roles = data["roles"]
        lines.append(f"{subject} holds: {', '.join(roles) if roles else '(no roles)'}")
        deciding = data["deciding"]
        if deciding is not None:
            lines.append(f"deciding rule: {deciding['where']}: {deciding['rule']}")
            chain = " -> ".join([subject, *(f"{link['role']} ({link['where']})"
                                            for link in data["role_path"])])
            lines.append(f"role path: {chain}")
        else:
            lines.append("deciding rule: none matched, so the request is denied (default deny)")
        for item in data["overridden"]:
            lines.append(f"overridden allow: {item['where']}: {item['rule']}")
        if data["nearest"]:
            lines.append("nearest rules that would allow it:")
            for item in data["nearest"]:
                lines.append(f"  {item['where']}: {item['rule']}")
                for reason in item["differs"]:
                    lines.append(f"    differs in {reason}")
        elif not self.decision.allowed and not self.overridden:
            lines.append("no allow rule names this action")
        if trace:
            lines.append("trace (every rule, in file order):")
            for item in data["trace"]:
                verdict = f"MATCH {item['effect']}" if item["matches"] else "no"
                lines.append(f"  {item['where']}: {verdict}: {item['rule']}")
                for reason in item["differs"]:
                    lines.append(f"    {reason}")
        return "\n".join(lines)


def explain(snapshot: Snapshot, subject: str, model: str, action: str,
            attributes: Attributes | None = None, *, nearest: int = 3) -> Explanation:
    """The decision, its rule and role path, and for a denial the nearest allowing rules."""
    decision = snapshot.decide(subject, model, action, attributes)
    evaluated = snapshot.evaluate(subject, model, action, attributes)
    deciding = next((spec for spec, why in evaluated if spec.where == decision.rule), None)
    path = snapshot.role_path(subject, deciding.sub) if deciding else None
    out = Explanation(decision, deciding, path or [], trace=evaluated)
    if not decision.allowed:
        out.overridden = [spec for spec, why in evaluated if not why and not spec.deny]
        candidates = [(spec, why) for spec, why in evaluated if why and not spec.deny]
        # Fewest differences first; a rule differing only in its condition is nearer than one
        # for another subject, which is nearer than one for another action.
        weight = {"condition": 1, "version": 1, "model": 2, "subject": 3, "action": 4}
        candidates.sort(key=lambda item: (len(item[1]),
                                          sum(weight[w.split(":")[0]] for w in item[1]),
                                          item[0].line))
        out.nearest = candidates[:nearest]
    return out


# --- diff -------------------------------------------------------------------------------


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


def repository_models(root: Path) -> list[tuple[str, str, dict[str, object]]]:
    """(name, version, attributes) of each model version under a repository root
    (``<root>/<name>/<version>/metadata.toml``: owner and labels), so diff evaluates
    conditions on model labels as the server would."""
    out: list[tuple[str, str, dict[str, object]]] = []
    if not root.is_dir():
        return out
    for model in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version in sorted(p for p in model.iterdir() if p.is_dir()):
            attrs: dict[str, object] = {"model.name": model.name, "model.version": version.name}
            try:
                table = tomllib.loads((version / "metadata.toml").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                table = {}
            # As the server does: model.owner is always set ("" when metadata names none).
            attrs["model.owner"] = table["owner"] if isinstance(table.get("owner"), str) else ""
            labels = table.get("labels")
            if isinstance(labels, dict):
                attrs.update({f"model.labels.{k}": v for k, v in labels.items()
                              if isinstance(k, str) and isinstance(v, str)})
            out.append((model.name, version.name, attrs))
    return out


def access_diff(old: Snapshot, new: Snapshot, *, models: set[str] = frozenset(),
                subjects: set[str] = frozenset(),
                attributes: Attributes | None = None,
                instances: list[tuple[str, str, dict[str, object]]] = ()) -> list[Change]:
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


# --- fmt --------------------------------------------------------------------------------


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


def _format_policy(text: str, source) -> str:
    by_line = {spec.line: spec for spec in source.rules}
    links = {link.line: link for link in source.links}
    out: list[str] = []
    for number, raw in enumerate(io.BytesIO(text.encode()), 1):  # numbered as parse_policy
        raw = raw.decode()
        line = raw.strip()
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

