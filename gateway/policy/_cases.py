"""Table-driven policy test cases (YAML), run by ``gateway policy test`` and on every reload.

    cases:
      - caller: spiffe://demo.local/svc/scorer
        model: demo-mlp
        action: infer
        attributes: {model.labels.stage: production}   # optional
        expect: allow                                   # or deny
        rule: policy.csv:12                             # optional: the deciding rule

``name`` and ``version`` (sets ``model.version``) are optional too. Unknown keys are
errors, so a typo cannot turn a case into one that silently tests nothing; so are, once the
policy is known, an unknown action, an attribute no rule reads or of the wrong type, and a
``rule`` that names no rule. Every case is located by ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway.policy._condition import (
    ATTRIBUTE_PREFIXES,
    attribute_kind,
    attribute_problem,
    did_you_mean,
    value_kind,
)
from gateway.policy._engine import DEFAULT_DENY, Decision, Snapshot
from gateway.policy._source import ACTIONS, POLICY_FILE, PolicyError, Problem

_KEYS = {"name", "caller", "model", "version", "action", "attributes", "expect", "rule"}


@dataclass(frozen=True, slots=True)
class Case:
    """One expectation about one request."""

    file: str
    line: int
    caller: str
    model: str
    action: str
    attributes: dict[str, object]
    allow: bool
    rule: str | None = None
    name: str = ""

    @property
    def where(self) -> str:
        """``file:line`` of the case, as editors and CI annotations read it."""
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        attrs = f" {self.attributes}" if self.attributes else ""
        return f"{self.caller} {self.action} {self.model or '(gateway)'}{attrs}"


@dataclass(slots=True)
class Failure:
    """A case whose decision differs from what it expects."""

    case: Case
    got: Decision

    def outcome(self) -> str:
        """What was expected and what happened (without the case's location)."""
        c = self.case
        want = "allow" if c.allow else "deny"
        got = "allow" if self.got.allowed else "deny"
        rule = f" (expected rule {c.rule})" if c.rule and got == want else ""
        return f"{c.describe()}: expected {want}{rule}, got {got} by {self.got.rule}"

    def __str__(self) -> str:
        label = f" [{self.case.name}]" if self.case.name else ""
        return f"{self.case.where}{label}: {self.outcome()}"


@dataclass(slots=True)
class Report:
    """Outcome of running cases: each decision, the failures, rules no case matched."""

    total: int = 0
    failures: list[Failure] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # "policy.csv:N: p, ..." lines
    results: list[tuple[Case, Decision]] = field(default_factory=list)


def load_cases(paths: list[Path], snapshot: Snapshot | None = None) -> list[Case]:
    """Parse case files; PolicyError naming the file and line of every problem.

    With ``snapshot`` every case is also checked against that policy (see the module
    docstring), so a case that cannot mean anything fails instead of passing.
    """
    texts: list[tuple[str, bytes]] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            texts.append((str(path), path.read_bytes()))
        except OSError as err:
            problems.append(Problem(str(path), 0, f"cannot read: {err.strerror}"))
    try:
        return parse_cases(texts, snapshot)
    except PolicyError as err:
        problems.extend(err.problems)
    raise PolicyError(problems)


def parse_cases(texts: list[tuple[str, bytes]], snapshot: Snapshot | None = None) -> list[Case]:
    """:func:`load_cases` for case files already read, as ``(name, bytes)`` pairs (a policy
    stored in PostgreSQL keeps its cases there); ``name`` is what problems are located by."""
    cases: list[Case] = []
    problems: list[Problem] = []
    for name, data in texts:
        try:
            loader = yaml.SafeLoader(data.decode("utf-8"))
            try:
                node = loader.get_single_node()
                doc = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except (UnicodeDecodeError, yaml.YAMLError) as err:
            mark = getattr(err, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            problems.append(Problem(name, line, f"not valid YAML: {getattr(err, 'problem', err)}"))
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
            problems.append(Problem(name, 0, "expected a mapping with a 'cases' list"))
            continue
        lines = _case_lines(node)
        for i, raw in enumerate(doc["cases"]):
            line, key_lines = lines[i] if i < len(lines) else (0, {})
            case = _parse_case(raw, name, line, problems)
            if case is not None and snapshot is not None:
                _check_case(case, snapshot, key_lines, problems)
            if case is not None:
                cases.append(case)
    if problems:
        raise PolicyError(problems)
    return cases


def _case_lines(root: yaml.Node | None) -> list[tuple[int, dict[str, int]]]:
    """For each item of the top-level ``cases`` list: its line, and the line of each key
    (attribute keys as ``attributes.<name>``)."""
    out: list[tuple[int, dict[str, int]]] = []
    if not isinstance(root, yaml.MappingNode):
        return out
    for key, value in root.value:
        if key.value != "cases" or not isinstance(value, yaml.SequenceNode):
            continue
        for item in value.value:
            keys: dict[str, int] = {}
            if isinstance(item, yaml.MappingNode):
                for k, v in item.value:
                    keys[str(k.value)] = k.start_mark.line + 1
                    if k.value == "attributes" and isinstance(v, yaml.MappingNode):
                        for ak, _ in v.value:
                            keys[f"attributes.{ak.value}"] = ak.start_mark.line + 1
            out.append((item.start_mark.line + 1, keys))
    return out


def _check_case(case: Case, snapshot: Snapshot, key_lines: dict[str, int],
                problems: list[Problem]) -> None:
    """Problems that make a case meaningless under ``snapshot``'s policy."""
    def bad(key: str, message: str) -> None:
        problems.append(Problem(case.file, key_lines.get(key, case.line), message))

    if case.action not in ACTIONS:
        bad("action", f"unknown action {case.action!r}{did_you_mean(case.action, ACTIONS)}; "
            f"actions: {', '.join(ACTIONS)}")
    read = snapshot.attributes
    for name, value in case.attributes.items():
        key = "version" if name == "model.version" and "version" in key_lines \
            else f"attributes.{name}"
        problem = attribute_problem(name)
        if problem is not None:
            bad(key, problem)
            continue
        kind = attribute_kind(name)
        if kind is not None and value_kind(value) != kind:
            bad(key, f"attribute {name} is a {kind}, not a {value_kind(value)} ({value!r})")
        elif name.startswith(("model.labels.", "anomaly.")) and name not in read:
            # Labels and anomaly scores have no fixed list: one no rule reads is a typo or a
            # stale case, and would silently decide nothing.
            bad(key, f"attribute {name} is read by no rule of this policy"
                f"{did_you_mean(name, sorted(read))}")
    if case.rule is not None and case.rule != DEFAULT_DENY:
        lines = {spec.where for spec in snapshot.source.rules}
        if case.rule not in lines:
            bad("rule", f"rule {case.rule!r} names no rule of this policy (expected "
                f"{POLICY_FILE}:<line of a p rule> or {DEFAULT_DENY})"
                f"{did_you_mean(case.rule, sorted(lines))}")


def _parse_case(raw: object, file: str, line: int, problems: list[Problem]) -> Case | None:
    def bad(message: str) -> None:
        problems.append(Problem(file, line, message))

    if not isinstance(raw, dict):
        bad("a case must be a mapping")
        return None
    unknown = sorted(set(map(str, raw)) - _KEYS)
    if unknown:
        bad(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
        return None
    for key in ("caller", "action", "expect"):
        if not isinstance(raw.get(key), str):
            bad(f"'{key}' is required and must be a string")
            return None
    model = raw.get("model", "")
    if not isinstance(model, str):
        bad("'model' must be a string ('' for gateway-level actions)")
        return None
    if raw["expect"] not in ("allow", "deny"):
        bad(f"'expect' must be allow or deny, not {raw['expect']!r}")
        return None
    attrs = raw.get("attributes") or {}
    if not isinstance(attrs, dict):
        bad("'attributes' must be a mapping")
        return None
    for key, value in attrs.items():
        if not isinstance(key, str) or not key.startswith(ATTRIBUTE_PREFIXES):
            bad(f"attribute {key!r} must start with one of {', '.join(ATTRIBUTE_PREFIXES)}")
            return None
        if not isinstance(value, str | int | float | bool):
            bad(f"attribute {key} must be a string, number or boolean")
            return None
    attrs = dict(attrs)
    if "version" in raw:
        attrs["model.version"] = str(raw["version"])
    rule = raw.get("rule")
    if rule is not None and not isinstance(rule, str):
        bad("'rule' must be a string such as policy.csv:12 or default-deny")
        return None
    return Case(file, line, raw["caller"], model, raw["action"], attrs, raw["expect"] == "allow",
                rule, str(raw.get("name", "")))


def run_cases(snapshot: Snapshot, cases: list[Case], *, coverage: bool = False) -> Report:
    """Decide every case on ``snapshot`` (the fast path, as the server would)."""
    report = Report(total=len(cases))
    matched: set[int] = set()
    for case in cases:
        got = snapshot.decide(case.caller, case.model, case.action, case.attributes)
        report.results.append((case, got))
        if got.allowed != case.allow or (case.rule is not None and got.rule != case.rule):
            report.failures.append(Failure(case, got))
        if coverage:
            for spec, why in snapshot.evaluate(case.caller, case.model, case.action,
                                               case.attributes):
                if not why:
                    matched.add(spec.index)
    if coverage:
        model = snapshot.source.model
        report.uncovered = [f"{spec.where}: {spec.text(model)}"
                            for spec in snapshot.source.rules if spec.index not in matched]
    return report
