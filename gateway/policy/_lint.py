"""Logic mistakes in a policy that loads: what ``gateway policy check`` warns about.

A policy can parse, compile and pass its cases and still say something its author did not
mean. Each finding names the rule and, where another rule is the reason, that rule too:

- ``duplicate``: a rule written twice (same subject, object, action, effect, condition);
- ``redundant``: an allow that grants nothing another allow does not already grant;
- ``shadowed``: an allow that a deny always overrides, so it never grants anything;
- ``unassigned-role``: a rule for a role no identity holds, so it never matches;
- ``never-true``: a condition no request can satisfy (``request.hour > 24``,
  ``x == 'a' && x == 'b'``).

"Covers" below means: every request the second rule matches, the first matches too. The
subject, action, object and version parts are decided exactly; conditions by evaluating them
on one representative value of every region their literals cut the attribute's domain into,
which is exact for comparisons and ``in`` lists of one attribute with literals. A condition
with ``globMatch`` or a comparison of two attributes is only ever compared by its text, so no
finding rests on an approximation.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.policy._condition import KNOWN_TYPES, Condition, _tokenize
from gateway.policy._engine import Snapshot
from gateway.policy._glob import Pattern
from gateway.policy._source import RuleSpec

#: Attributes the gateway supplies within a fixed range (inclusive).
_RANGES: dict[str, tuple[int, int]] = {"request.hour": (0, 23)}
#: Attributes the gateway never sets below this value.
_MINIMUM: dict[str, int] = {"request.batch_size": 0, "request.input_bytes": 0,
                            "request.time": 0}
_MAX_ASSIGNMENTS = 50_000
_CMP = {"==", "!=", "<", "<=", ">", ">="}
_IDENTITY_PREFIXES = ("spiffe://", "cn:")


@dataclass(frozen=True, slots=True)
class Finding:
    """One warning: ``kind``, the rule it is about (``line``) and the rule that causes it."""

    kind: str
    line: int
    message: str
    other: int | None = None
    related: tuple[str, ...] = field(default=())


def lint(snapshot: Snapshot,
         where: Callable[[int], str] = lambda line: f"policy.csv:{line}") -> list[Finding]:
    """Every logic finding of ``snapshot``, in line order. ``where(line)`` renders a rule's
    location in messages (the CLI passes one relative to the working directory)."""
    model = snapshot.source.model
    rules = snapshot.source.rules
    findings: list[Finding] = []
    seen: dict[tuple, RuleSpec] = {}
    duplicates: set[int] = set()
    for spec in rules:
        key = (spec.sub, spec.obj, spec.act, spec.deny, spec.cond.text if spec.cond else None)
        first = seen.setdefault(key, spec)
        if first is not spec:
            duplicates.add(spec.index)
            findings.append(Finding("duplicate", spec.line,
                                    f"duplicate of {where(first.line)}: {spec.text(model)}",
                                    first.line))
    held = _held_roles(snapshot)
    never: set[int] = set()
    for spec in rules:
        if not spec.sub.startswith(_IDENTITY_PREFIXES) and spec.sub not in held:
            never.add(spec.index)
            findings.append(Finding("unassigned-role", spec.line,
                                    f"never matches: no identity holds {spec.sub!r} (no g line "
                                    f"gives it to a spiffe:// or cn: identity)"))
        elif spec.cond is not None and _never_true(spec.cond):
            never.add(spec.index)
            findings.append(Finding("never-true", spec.line,
                                    f"never matches: no request satisfies the condition "
                                    f"{spec.cond.text}{_range_note(spec.cond)}"))
    index = _index(rules)
    for spec in rules:
        if spec.deny or spec.index in duplicates or spec.index in never:
            continue
        for deny, kind, says in ((True, "shadowed", "never grants: the deny at {} ({}) matches "
                                  "every request it matches"),
                                 (False, "redundant", "redundant: the allow at {} ({}) already "
                                  "grants everything it grants")):
            cover = _first_cover(snapshot, index, spec, deny=deny)
            if cover is not None:
                findings.append(Finding(kind, spec.line, says.format(
                    where(cover.line), cover.text(model)), cover.line))
                break
    findings.sort(key=lambda f: (f.line, f.kind))
    return findings


def _held_roles(snapshot: Snapshot) -> set[str]:
    """Every role some identity (spiffe:// or cn:) holds, directly or through other roles."""
    held: set[str] = set()
    for link in snapshot.source.links:
        if link.member.startswith(_IDENTITY_PREFIXES):
            held.update(snapshot.roles_of(link.member)[1:])
    return held


_Index = dict[tuple[str, str, bool, str | None], list[RuleSpec]]


def _index(rules: list[RuleSpec]) -> _Index:
    """(subject, action, deny, exact model name or None for patterns) -> rules, so the rules
    that could cover one are looked up, not scanned (policies have 100k rules)."""
    out: _Index = {}
    for spec in rules:
        for action in spec.actions:
            out.setdefault((spec.sub, action, spec.deny, spec.name.exact), []).append(spec)
    return out


def _first_cover(snapshot: Snapshot, index: _Index, spec: RuleSpec, *,
                 deny: bool) -> RuleSpec | None:
    """The first rule of effect ``deny`` that matches every request ``spec`` matches."""
    best: RuleSpec | None = None
    action = spec.actions[0]
    names = (None,) if spec.name.exact is None else (spec.name.exact, None)
    for role in snapshot.roles_of(spec.sub):
        for name in names:
            for other in index.get((role, action, deny, name), ()):
                if other.index == spec.index or (best is not None and other.line >= best.line):
                    continue
                if not (set(spec.actions) <= set(other.actions)
                        and _pattern_covers(other.name, spec.name)
                        and _version_covers(other.version, spec.version)
                        and implies(spec.cond, other.cond)):
                    continue
                if not deny and _mutual(snapshot, other, spec) and other.line > spec.line:
                    continue  # two equivalent allows: only the later one is redundant
                best = other
    return best


def _mutual(snapshot: Snapshot, a: RuleSpec, b: RuleSpec) -> bool:
    return (b.sub in snapshot.roles_of(a.sub) and set(a.actions) <= set(b.actions)
            and _pattern_covers(b.name, a.name) and _version_covers(b.version, a.version)
            and implies(a.cond, b.cond))


def _pattern_covers(a: Pattern, b: Pattern) -> bool:
    """Whether pattern ``a`` matches every name ``b`` matches (decided only where exact)."""
    if a.source == b.source:
        return True
    if b.exact is not None:
        return a.match(b.exact)
    return a.exact is None and a.source in ("*", "**")  # matches any model name


def _version_covers(a: Pattern | None, b: Pattern | None) -> bool:
    return a is None or (b is not None and _pattern_covers(a, b))


# --- conditions --------------------------------------------------------------------------


def implies(a: Condition | None, b: Condition | None) -> bool:
    """Whether every request satisfying ``a`` satisfies ``b`` (None: no condition, true)."""
    if b is None:
        return True
    if a is None:
        return False  # b needs its attributes; a request without them satisfies only a
    if a.text == b.text:
        return True
    return _implies(a, b)


@functools.lru_cache(maxsize=4096)
def _implies(a: Condition, b: Condition) -> bool:
    if not set(b.attributes) <= set(a.attributes):
        return False  # a request without b's other attributes satisfies a, never b
    assignments = _assignments([a, b])
    if assignments is None:
        return False
    return all(b(attrs) for attrs in assignments if a(attrs))


@functools.lru_cache(maxsize=4096)
def _never_true(cond: Condition) -> bool:
    assignments = _assignments([cond])
    return assignments is not None and not any(cond(attrs) for attrs in assignments)


def _range_note(cond: Condition) -> str:
    notes = [f"{name} is {lo}..{hi}" for name, (lo, hi) in _RANGES.items()
             if name in cond.attributes]
    return f" ({', '.join(notes)})" if notes else ""


def _assignments(conds: list[Condition]) -> Iterable[dict[str, object]] | None:
    """Representative attribute values for ``conds`` (None: not decidable exactly)."""
    literals: list[object] = []
    for cond in conds:
        tokens = list(_tokenize(cond.text))
        for i, (kind, value, _) in enumerate(tokens):
            if kind == "name" and value == "globMatch":
                return None
            if kind in ("str", "num"):
                literals.append(value)
            elif kind == "name" and value in ("true", "false"):
                literals.append(value == "true")
            if (kind == "op" and value in _CMP and 0 < i < len(tokens) - 1
                    and _is_attribute(tokens[i - 1]) and _is_attribute(tokens[i + 1])):
                return None
    names = sorted({name for cond in conds for name in cond.attributes})
    domains = [_candidates(name, literals) for name in names]
    if math.prod(len(d) for d in domains) > _MAX_ASSIGNMENTS:
        return None
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*domains)]


def _is_attribute(token: tuple[str, object, int]) -> bool:
    return token[0] == "name" and token[1] not in ("true", "false", "in", "globMatch")


def _candidates(name: str, literals: list[object]) -> list[object]:
    """One value in every region the literals cut ``name``'s domain into, and the literals."""
    if name in _RANGES:
        lo, hi = _RANGES[name]
        return list(range(lo, hi + 1))
    kind = KNOWN_TYPES.get(name, str if name.startswith("model.labels.") else None)
    numbers = sorted({float(v) for v in literals
                      if isinstance(v, int | float) and not isinstance(v, bool)})
    strings = sorted({v for v in literals if isinstance(v, str)})
    out: list[object] = []
    if kind in (None, int):
        points: set[float] = set()
        for n in numbers:
            points.update({math.floor(n) - 1, math.floor(n), math.ceil(n), math.ceil(n) + 1})
        points.add(0)
        if kind is None:  # any number: also the literals themselves and the gaps between
            points.update(numbers)
            points.update((x + y) / 2 for x, y in itertools.pairwise(numbers))
        minimum = _MINIMUM.get(name)
        out.extend(sorted(p for p in points if minimum is None or p >= minimum))
    if kind in (None, str):
        out.extend(strings)
        out.append("\x00none of the literals")
    if kind in (None, bool):
        out.extend((True, False))
    return out
