"""``policy.csv``: casbin's policy lines (``p`` rules, ``g`` role links), every field checked.

Every problem is collected with its line, so ``gateway policy check`` can list them all.
"""

from __future__ import annotations

import io
import re

from gateway.policy._condition import Condition, ConditionError, did_you_mean, parse_condition
from gateway.policy._glob import Pattern, compile_pattern
from gateway.policy._spec import ACTIONS, POLICY_FILE, LinkSpec, ModelSpec, Problem, RuleSpec

_SPIFFE = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()*+=:@%-]+)+\Z")
# Names may hold inner spaces (certificate CNs do) but no commas, quotes, '#' or controls.
_NAME = re.compile(r"[^\x00-\x1f\x7f,#\"'()\[\]]+\Z")
_PLAIN = re.compile(r"[^'\"()\[\]]*\Z")
_SPACE = re.compile(r"\s")


def split_fields(line: str) -> list[str] | str:
    """casbin's policy-line split (commas inside () or [] do not separate), also honouring
    quotes; returns the stripped fields or a message saying what is unbalanced."""
    if _PLAIN.match(line):  # the common case: no quotes or brackets
        return [f.strip() for f in line.split(",")]
    fields: list[str] = [""]
    depth = 0
    quote = ""
    escaped = False
    for c in line:
        if quote:
            fields[-1] += c
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
            continue
        if c in "'\"":
            quote = c
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth < 0:
                return f"unbalanced {c!r}"
        elif c == "," and depth == 0:
            fields.append("")
            continue
        fields[-1] += c
    if quote:
        return "unterminated string"
    if depth:
        return "unbalanced '(' or '['"
    return [f.strip() for f in fields]


class _Parser:
    """Parses policy.csv lines, memoizing what repeats across 100k rules (patterns, action
    sets, checked names): compile time is reload time."""

    def __init__(self, model: ModelSpec, problems: list[Problem]) -> None:
        self.model = model
        self.problems = problems
        self.patterns: dict[str, Pattern | str] = {}       # pattern -> compiled or error
        self.actions: dict[str, tuple[str, ...] | str] = {}  # act -> actions or error
        self.names: dict[str, str | None] = {}              # subject -> error or None
        self.conditions: dict[str, Condition | str] = {}
        self.objects: dict[str, tuple[Pattern, Pattern | None]] = {}  # valid objects only

    def subject_problem(self, name: str) -> str | None:
        if name not in self.names:
            self.names[name] = _check_subject(name)
        return self.names[name]

    def pattern(self, text: str) -> Pattern | str:
        found = self.patterns.get(text)
        if found is None:
            try:
                found = compile_pattern(self.model.obj, text)
            except ValueError as err:
                found = str(err)
            self.patterns[text] = found
        return found

    def action_set(self, act: str) -> tuple[str, ...] | str:
        found = self.actions.get(act)
        if found is None:
            try:
                match = compile_pattern(self.model.act, act).match
            except ValueError as err:
                found = f"bad action pattern {act!r}: {err}"
            else:
                found = tuple(a for a in ACTIONS if match(a)) or \
                    f"unknown action {act!r}{did_you_mean(act, ACTIONS)}; actions: " \
                    + ", ".join(ACTIONS)
            self.actions[act] = found
        return found

    def condition(self, text: str) -> Condition | str:
        found = self.conditions.get(text)
        if found is None:
            try:
                found = parse_condition(text)
            except ConditionError as err:
                found = f"bad condition: {err}"
            self.conditions[text] = found
        return found

    def rule(self, values: list[str], index: int, number: int) -> RuleSpec | None:
        """A validated rule; the fast path serves fields already seen valid (the common
        case at 100k rules), the slow path below names every problem."""
        sub, obj, act = values[0], values[1], values[2]
        objects = self.objects.get(obj)
        actions = self.actions.get(act)
        if (objects is not None and actions is not None and type(actions) is tuple
                and self.names.get(sub, "?") is None):
            extra = values[3:]
            if not extra:
                return RuleSpec(index, number, sub, obj, act, False, None, objects[0],
                                objects[1], actions)
            eft = extra[0]
            if (eft == "allow" or (eft == "deny" and self.model.effect != "allow")) and \
                    (len(extra) == 1 or not extra[1]):
                return RuleSpec(index, number, sub, obj, act, eft == "deny", None, objects[0],
                                objects[1], actions)
        return self.slow_rule(values, index, number)

    def slow_rule(self, values: list[str], index: int, number: int) -> RuleSpec | None:
        model = self.model
        problems = self.problems
        before = len(problems)
        sub, obj, act = values[0], values[1], values[2]

        def bad(message: str) -> None:
            problems.append(Problem(POLICY_FILE, number, message))

        message = self.subject_problem(sub)
        if message:
            bad(message)
        name: Pattern | str | None = None
        version: Pattern | str | None = None
        name_part, colon, version_part = obj.partition(":")
        if not name_part or (colon and not version_part) or _SPACE.search(obj):
            bad(f"bad object {obj!r}: a model name or pattern, optionally ':version'")
        else:
            name = self.pattern(name_part)
            version = self.pattern(version_part) if colon else None
            for part in (name, version):
                if isinstance(part, str):
                    bad(f"bad object pattern {obj!r}: {part}")
        actions = self.action_set(act)
        if isinstance(actions, str):
            bad(actions)
        deny = False
        if len(model.p_fields) > 3:
            eft = values[3]
            if eft not in ("allow", "deny"):
                bad(f"effect must be 'allow' or 'deny', not {eft!r}")
            elif eft == "deny" and model.effect == "allow":
                bad("deny rule, but the policy_effect only counts allows (it would be ignored)")
            deny = eft == "deny"
        cond = None
        if len(model.p_fields) > 4 and values[4]:
            cond = self.condition(values[4])
            if isinstance(cond, str):
                bad(cond)
        if len(problems) > before:
            return None
        self.objects[obj] = (name, version)  # type: ignore[assignment]
        return RuleSpec(index, number, sub, obj, act, deny, cond, name, version,  # type: ignore[arg-type]
                        actions)  # type: ignore[arg-type]


def parse_policy(data: bytes, model: ModelSpec,
                 problems: list[Problem]) -> tuple[list[RuleSpec], list[LinkSpec]]:
    """Parse policy.csv lines into rules and role links, validating every field."""
    rules: list[RuleSpec] = []
    links: list[LinkSpec] = []
    parser = _Parser(model, problems)
    n_p = len(model.p_fields)
    # Lines one at a time, decoded one at a time (not decode + splitlines()): one C call over
    # a 5 MB policy holds the GIL for milliseconds, and so does freeing 100k lines at once.
    for number, raw_bytes in enumerate(io.BytesIO(data), 1):
        try:
            raw = raw_bytes.decode("utf-8-sig" if number == 1 else "utf-8")  # BOM-tolerant
        except UnicodeDecodeError as err:
            problems.append(Problem(POLICY_FILE, number, f"not UTF-8 text ({err.reason})"))
            continue
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        fields = split_fields(line)
        if isinstance(fields, str):
            problems.append(Problem(POLICY_FILE, number, fields))
            continue
        kind = fields[0]
        values = fields[1:]
        if kind == "p":
            if model.conditions and len(values) == n_p - 1:
                values.append("")  # the condition is optional
            if len(values) != n_p:
                problems.append(Problem(POLICY_FILE, number, f"p rule needs {n_p} fields "
                                        f"({', '.join(model.p_fields)}), found {len(values)}"))
                continue
            rule = parser.rule(values, len(rules), number)
            if rule is not None:
                rules.append(rule)
            continue
        if kind != "g":
            problems.append(Problem(POLICY_FILE, number, f"unknown rule type {kind!r}: only 'p' "
                                    "(permission) and 'g' (role) lines are supported"))
            continue
        if model.subject != "g":
            message = "g rule, but the model has no role definition used by the matcher"
        elif len(values) != 2:
            message = f"g rule needs 2 fields (member, role), found {len(values)}"
        else:
            member, role = values
            problem = parser.subject_problem(member) or parser.subject_problem(role)
            message = problem or ""
            if not message and member == role:
                message = f"{member!r} is given itself as a role"
        if message:
            problems.append(Problem(POLICY_FILE, number, message))
        else:
            links.append(LinkSpec(number, member, role))
    _check_cycles(links, problems)
    return rules, links


def _check_subject(name: str) -> str | None:
    if not name:
        return "empty subject or role"
    if not _NAME.match(name):
        return (f"bad subject or role name {name!r} (no commas, quotes, brackets, '#' or "
                "control characters)")
    if name.startswith("spiffe://") and not _SPIFFE.match(name):
        return (f"malformed SPIFFE ID {name!r} (lower-case trust domain, non-empty path "
                "segments)")
    if name.startswith("spiffe://") and any(s in (".", "..") for s in name[9:].split("/")):
        return f"malformed SPIFFE ID {name!r} ('.' or '..' segment)"
    return None


def _check_cycles(links: list[LinkSpec], problems: list[Problem]) -> None:
    """Report each g link that closes a cycle (iterative DFS: hierarchies may be deep)."""
    edges: dict[str, list[LinkSpec]] = {}
    for link in links:
        edges.setdefault(link.member, []).append(link)
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    for root in list(edges):
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(edges.get(root, ())))]
        while stack:
            node, children = stack[-1]
            edge = next(children, None)
            if edge is None:
                state[node] = 2
                stack.pop()
            elif state.get(edge.role) == 1:
                problems.append(Problem(POLICY_FILE, edge.line, f"role cycle: {edge.role!r} "
                                        f"reaches itself through {edge.member!r}"))
            elif edge.role not in state:
                state[edge.role] = 1
                stack.append((edge.role, iter(edges.get(edge.role, ()))))
