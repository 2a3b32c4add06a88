"""Table-driven policy test cases (YAML), run by ``gateway policy test`` and on every reload.

    cases:
      - caller: spiffe://demo.local/svc/scorer
        model: demo-mlp
        action: infer
        attributes: {model.labels.stage: production}   # optional
        expect: allow                                   # or deny
        rule: policy.csv:12                             # optional: the deciding rule

``name`` and ``version`` (sets ``model.version``) are optional too. Unknown keys are
errors, so a typo cannot turn a case into one that silently tests nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway.policy._condition import ATTRIBUTE_PREFIXES
from gateway.policy._engine import Decision, Snapshot
from gateway.policy._source import PolicyError, Problem

_KEYS = {"name", "caller", "model", "version", "action", "attributes", "expect", "rule"}


@dataclass(frozen=True, slots=True)
class Case:
    """One expectation about one request."""

    where: str
    caller: str
    model: str
    action: str
    attributes: dict[str, object]
    allow: bool
    rule: str | None = None
    name: str = ""

    def describe(self) -> str:
        attrs = f" {self.attributes}" if self.attributes else ""
        return f"{self.caller} {self.action} {self.model or '(gateway)'}{attrs}"


@dataclass(slots=True)
class Failure:
    """A case whose decision differs from what it expects."""

    case: Case
    got: Decision

    def __str__(self) -> str:
        c = self.case
        want = "allow" if c.allow else "deny"
        got = "allow" if self.got.allowed else "deny"
        rule = f" (expected rule {c.rule})" if c.rule and got == want else ""
        label = f" [{c.name}]" if c.name else ""
        return (f"{c.where}{label}: {c.describe()}: expected {want}{rule}, got {got} "
                f"by {self.got.rule}")


@dataclass(slots=True)
class Report:
    """Outcome of running cases: failures and which rules no case matched."""

    total: int = 0
    failures: list[Failure] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # "policy.csv:N: p, ..." lines


def load_cases(paths: list[Path]) -> list[Case]:
    """Parse case files; PolicyError naming the file and case index of every problem."""
    cases: list[Case] = []
    problems: list[Problem] = []
    for path in paths:
        name = str(path)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            problems.append(Problem(name, 0, f"cannot read: {err.strerror}"))
            continue
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            problems.append(Problem(name, line, f"not valid YAML: {getattr(err, 'problem', err)}"))
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
            problems.append(Problem(name, 0, "expected a mapping with a 'cases' list"))
            continue
        for i, raw in enumerate(doc["cases"]):
            where = f"{name} case {i + 1}"
            case = _parse_case(raw, where, problems)
            if case is not None:
                cases.append(case)
    if problems:
        raise PolicyError(problems)
    return cases


def _parse_case(raw: object, where: str, problems: list[Problem]) -> Case | None:
    def bad(message: str) -> None:
        problems.append(Problem(where, 0, message))

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
    return Case(where, raw["caller"], model, raw["action"], attrs, raw["expect"] == "allow",
                rule, str(raw.get("name", "")))


def run_cases(snapshot: Snapshot, cases: list[Case], *, coverage: bool = False) -> Report:
    """Decide every case on ``snapshot`` (the fast path, as the server would)."""
    report = Report(total=len(cases))
    matched: set[int] = set()
    for case in cases:
        got = snapshot.decide(case.caller, case.model, case.action, case.attributes)
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
