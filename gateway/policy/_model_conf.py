"""``model.conf``, casbin's INI dialect, reduced to the forms the compiled engine implements.

Anything else is rejected rather than half-supported, because a silently ignored matcher
clause is an authorization bug (see policies/README.md for the accepted forms).
"""

from __future__ import annotations

import re

from gateway.policy._spec import MODEL_FILE, ModelSpec, Problem

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

    r_line, r_fields = fields("request_definition")
    if r_fields != ("sub", "obj", "act"):
        problems.append(Problem(MODEL_FILE, r_line, "request_definition must be "
                                "'r = sub, obj, act'"))
    p_line, p_fields = fields("policy_definition")
    if p_fields not in (("sub", "obj", "act"), ("sub", "obj", "act", "eft"),
                        ("sub", "obj", "act", "eft", "cond")):
        problems.append(Problem(MODEL_FILE, p_line, "policy_definition must be 'p = sub, obj, act'"
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
