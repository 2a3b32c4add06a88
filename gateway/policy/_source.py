"""Reading a policy directory: ``model.conf`` and ``policy.csv`` in casbin's formats, strictly.

Every problem is collected with its file and line (not only the first), so ``gateway policy
check`` can list them all. The model file must be one of the forms the compiled engine
implements exactly (see policies/README.md); anything else is rejected rather than
half-supported, because a silently ignored matcher clause is an authorization bug.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from gateway.errors import ConfigError
from gateway.policy._condition import Condition, ConditionError, did_you_mean, parse_condition
from gateway.policy._glob import Pattern, compile_pattern

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"
CASES_DIR = "tests"

#: Actions a rule may name; see policies/README.md for what each one guards.
ACTIONS: tuple[str, ...] = (
    "ready",          # ModelReady
    "metadata",       # ModelMetadata
    "infer",          # ModelInfer
    "explain",        # explanation RPCs on a model
    "model.load",     # admin: load or reload a model version
    "model.unload",   # admin: unload a model version
    "policy.load",    # admin: reload the policy
    "policy.read",    # admin: read the live policy and its digest
    "audit.read",     # audit log checkpoints, entries and proofs
    "reflect",        # gRPC server reflection (lists every service and message type)
)

#: The object server-level actions are decided on (requests with model "" or "*").
GATEWAY_OBJECT = "@gateway"

_EFFECTS = {
    "some(where(p.eft==allow))": "allow",
    "some(where(p.eft==allow))&&!some(where(p.eft==deny))": "allow-and-deny",
    "!some(where(p.eft==deny))": "deny-override",
}
_SUBJECT_CLAUSES = {"g(r.sub,p.sub)": "g", "r.sub==p.sub": "eq"}
_OBJECT_CLAUSES = {"r.obj==p.obj": "eq", "keyMatch(r.obj,p.obj)": "key",
                   "globMatch(r.obj,p.obj)": "glob"}
_ACTION_CLAUSES = {"r.act==p.act": "eq", "keyMatch(r.act,p.act)": "key",
                   "globMatch(r.act,p.act)": "glob"}
_COND_CLAUSE = "eval(p.cond)"
_SPIFFE = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()*+=:@%-]+)+\Z")
# Names may hold inner spaces (certificate CNs do) but no commas, quotes, '#' or controls.
_NAME = re.compile(r"[^\x00-\x1f\x7f,#\"'()\[\]]+\Z")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy, located by file and line (0: the file as a whole)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else \
            f"{self.file}: {self.message}"


class PolicyError(ConfigError):
    """A policy directory is invalid; ``problems`` lists every problem found, located."""

    def __init__(self, problems: list[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("policy", 0, problems)]
        self.problems = list(problems)
        head = str(self.problems[0]) if self.problems else "invalid policy"
        more = len(self.problems) - 1
        super().__init__(head + (f" (and {more} more problem(s))" if more > 0 else ""))

    def diagnostics(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The supported shape of a model.conf, reduced to the choices that matter."""

    p_fields: tuple[str, ...]
    subject: str          # "g" (roles) or "eq"
    obj: str              # "eq", "key" or "glob"
    act: str              # "eq", "key" or "glob"
    effect: str           # "allow", "allow-and-deny" or "deny-override"
    conditions: bool      # p has a cond field and the matcher evaluates it


class RuleSpec(NamedTuple):
    """A parsed ``p`` line (a NamedTuple: 100k of them are built per reload)."""

    index: int
    line: int
    sub: str
    obj: str
    act: str
    deny: bool
    cond: Condition | None
    name: Pattern
    version: Pattern | None
    actions: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{POLICY_FILE}:{self.line}"

    def text(self, model: ModelSpec) -> str:
        """The rule as canonical policy.csv text."""
        fields = ["p", self.sub, self.obj, self.act]
        if "eft" in model.p_fields:
            fields.append("deny" if self.deny else "allow")
        if self.cond is not None:
            fields.append(self.cond.text)
        return ", ".join(fields)


class LinkSpec(NamedTuple):
    """A parsed ``g`` line: ``member`` has role ``role``."""

    line: int
    member: str
    role: str

    @property
    def where(self) -> str:
        return f"{POLICY_FILE}:{self.line}"


@dataclass(slots=True)
class PolicySource:
    """Everything read from a policy directory, before compilation."""

    model: ModelSpec
    rules: list[RuleSpec]
    links: list[LinkSpec]
    digest: str
    files: dict[str, bytes] = field(default_factory=dict)


def digest_files(files: dict[str, bytes]) -> str:
    """SHA-256 over the named files, framed (name, length, bytes) so no two sets collide."""
    h = hashlib.sha256(b"gateway-policy-digest-v1\n")
    for name in sorted(files):
        data = files[name]
        h.update(f"{name}\n{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def read_directory(directory: Path) -> dict[str, bytes]:
    """The bytes of model.conf and policy.csv; PolicyError naming what is missing."""
    files: dict[str, bytes] = {}
    problems = []
    for name in (MODEL_FILE, POLICY_FILE):
        try:
            files[name] = (directory / name).read_bytes()
        except FileNotFoundError:
            problems.append(Problem(name, 0, f"missing from {directory}"))
        except OSError as err:
            problems.append(Problem(name, 0, f"cannot read: {err.strerror}"))
    if problems:
        raise PolicyError(problems)
    return files


def parse_files(files: dict[str, bytes]) -> PolicySource:
    """Parse and validate both files; raise PolicyError listing every problem."""
    problems: list[Problem] = []
    try:
        model_text = files[MODEL_FILE].decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PolicyError([Problem(MODEL_FILE, 0, f"not UTF-8 text ({err.reason} at byte "
                                   f"{err.start})")]) from None
    model = parse_model(model_text, problems)
    if model is None:
        raise PolicyError(problems)
    rules, links = parse_policy(files[POLICY_FILE], model, problems)
    if problems:
        raise PolicyError(problems)
    return PolicySource(model, rules, links, digest_files(files), dict(files))


# --- model.conf -------------------------------------------------------------------------


def parse_model(text: str, problems: list[Problem]) -> ModelSpec | None:
    """Parse model.conf (casbin's INI dialect) into a :class:`ModelSpec`."""
    sections: dict[str, dict[str, tuple[int, str]]] = {}
    known = {"request_definition": "r", "policy_definition": "p", "role_definition": "g",
             "policy_effect": "e", "matchers": "m"}
    current = None
    pending: tuple[int, str, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if pending is not None:  # continuation of a value ending in '\'
            start, key, value = pending
            value += " " + line.rstrip("\\").strip()
            pending = (start, key, value) if line.endswith("\\") else None
            if pending is None and current is not None:
                sections[current][key] = (start, value)
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                problems.append(Problem(MODEL_FILE, number, f"malformed section header {line!r}"))
                current = None
                continue
            current = line[1:-1].strip()
            if current not in known:
                problems.append(Problem(MODEL_FILE, number, f"unsupported section [{current}]; "
                                        f"supported: {', '.join(known)}"))
                current = None
            elif current in sections:
                problems.append(Problem(MODEL_FILE, number, f"duplicate section [{current}]"))
            else:
                sections[current] = {}
            continue
        if current is None:
            if not problems or problems[-1].line != number:
                problems.append(Problem(MODEL_FILE, number, "line outside a known section"))
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(MODEL_FILE, number, f"expected 'key = value', got {line!r}"))
            continue
        if key != known[current]:
            problems.append(Problem(MODEL_FILE, number, f"unsupported key {key!r} in [{current}]"
                                    f" (only {known[current]!r}: one policy type, one role "
                                    "type, one matcher)"))
            continue
        if key in sections[current]:
            problems.append(Problem(MODEL_FILE, number, f"duplicate key {key!r}"))
            continue
        value = value.strip()
        if value.endswith("\\"):
            pending = (number, key, value[:-1].strip())
            continue
        sections[current][key] = (number, value)
    before = len(problems)
    for name in ("request_definition", "policy_definition", "policy_effect", "matchers"):
        if not sections.get(name):
            problems.append(Problem(MODEL_FILE, 0, f"missing [{name}] with "
                                    f"'{known[name]} = ...'"))
    if len(problems) > before or problems:
        return None

    def fields(section: str) -> tuple[int, tuple[str, ...]]:
        line, value = sections[section][known[section]]
        return line, tuple(f.strip() for f in value.split(","))

    line, r_fields = fields("request_definition")
    if r_fields != ("sub", "obj", "act"):
        problems.append(Problem(MODEL_FILE, line, "request_definition must be "
                                "'r = sub, obj, act'"))
    line, p_fields = fields("policy_definition")
    if p_fields not in (("sub", "obj", "act"), ("sub", "obj", "act", "eft"),
                        ("sub", "obj", "act", "eft", "cond")):
        problems.append(Problem(MODEL_FILE, line, "policy_definition must be 'p = sub, obj, act'"
                                ", 'p = sub, obj, act, eft' or 'p = sub, obj, act, eft, cond'"))
    has_g = bool(sections.get("role_definition"))
    if has_g:
        g_line, g_fields = fields("role_definition")
        if g_fields != ("_", "_"):
            problems.append(Problem(MODEL_FILE, g_line, "role_definition must be 'g = _, _' "
                                    "(domains and other role types are not supported)"))
    e_line, e_value = sections["policy_effect"]["e"]
    effect = _EFFECTS.get(re.sub(r"\s+", "", e_value))
    if effect is None:
        problems.append(Problem(MODEL_FILE, e_line, f"unsupported policy_effect {e_value!r}; "
                                "supported: " + "; ".join(
                                    ("some(where (p.eft == allow))",
                                     "some(where (p.eft == allow)) && !some(where (p.eft == deny))",
                                     "!some(where (p.eft == deny))"))))
    elif effect != "allow" and "eft" not in p_fields:
        problems.append(Problem(MODEL_FILE, e_line, "a deny effect needs 'eft' in "
                                "policy_definition"))
    m_line, m_value = sections["matchers"]["m"]
    clauses = _split_and(re.sub(r"\s+", "", m_value))
    kinds: dict[str, str] = {}
    for clause in clauses:
        for role, table in (("subject", _SUBJECT_CLAUSES), ("object", _OBJECT_CLAUSES),
                            ("action", _ACTION_CLAUSES), ("cond", {_COND_CLAUSE: "eval"})):
            if clause in table:
                if role in kinds:
                    problems.append(Problem(MODEL_FILE, m_line, f"matcher tests the {role} "
                                            "twice"))
                kinds[role] = table[clause]
                break
        else:
            problems.append(Problem(MODEL_FILE, m_line, f"unsupported matcher clause {clause!r};"
                                    " the matcher must be a conjunction of one subject clause "
                                    "(g(r.sub, p.sub) or r.sub == p.sub), one object clause "
                                    "(r.obj == p.obj, keyMatch or globMatch), one action clause"
                                    " and, with a cond field, eval(p.cond)"))
    for role in ("subject", "object", "action"):
        if role not in kinds:
            problems.append(Problem(MODEL_FILE, m_line, f"matcher does not test the {role}"))
    if kinds.get("subject") == "g" and not has_g:
        problems.append(Problem(MODEL_FILE, m_line, "matcher uses g() but there is no "
                                "[role_definition]"))
    if "cond" in p_fields and "cond" not in kinds:
        problems.append(Problem(MODEL_FILE, m_line, "policy_definition has 'cond' but the "
                                "matcher does not evaluate it: add '&& eval(p.cond)'"))
    if "cond" in kinds and "cond" not in p_fields:
        problems.append(Problem(MODEL_FILE, m_line, "eval(p.cond) needs 'cond' in "
                                "policy_definition"))
    if problems:
        return None
    return ModelSpec(p_fields, kinds["subject"], kinds["object"], kinds["action"],
                     effect or "allow", "cond" in kinds)


def _split_and(text: str) -> list[str]:
    """Split a whitespace-free matcher on top-level ``&&``, dropping enclosing parentheses."""
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1]
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and text.startswith("&&", i):
            parts.append(text[start:i])
            start = i + 2
            i += 1
        i += 1
    parts.append(text[start:])
    out = []
    for part in parts:
        while part.startswith("(") and part.endswith(")") and _balanced(part[1:-1]):
            part = part[1:-1]
        out.append(part)
    return out


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += c == "("
        depth -= c == ")"
        if depth < 0:
            return False
    return depth == 0


# --- policy.csv -------------------------------------------------------------------------


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
            message = parser.subject_problem(member) or parser.subject_problem(role)
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
            link = next(children, None)
            if link is None:
                state[node] = 2
                stack.pop()
            elif state.get(link.role) == 1:
                problems.append(Problem(POLICY_FILE, link.line, f"role cycle: {link.role!r} "
                                        f"reaches itself through {link.member!r}"))
            elif link.role not in state:
                state[link.role] = 1
                stack.append((link.role, iter(edges.get(link.role, ()))))
