"""ABAC conditions: a tiny expression language parsed here, never handed to ``eval``.

Why a parser of our own: casbin's ``eval(p.cond)`` pastes rule text into the matcher, so the
rule ``True) || (True`` rewrote the matcher and a rule could call methods on request objects.
Here a condition is tokenized and parsed by a recursive-descent parser into closures over
the attribute mapping; the only things a condition can do are the ones this grammar names.

Grammar (whitespace between tokens is free)::

    expr    := and ( '||' and )*
    and     := unary ( '&&' unary )*
    unary   := '!' unary | primary
    primary := '(' expr ')' | 'true' | 'false'
             | 'globMatch' '(' value ',' STRING ')'
             | value ( CMP value | 'in' '(' literal ( ',' literal )* ')' )?
    CMP     := '==' | '!=' | '<' | '<=' | '>' | '>='
    value   := ATTRIBUTE | literal
    literal := STRING | NUMBER | 'true' | 'false'

An ATTRIBUTE is a dotted name under one of :data:`ATTRIBUTE_PREFIXES`; a bare attribute is
true when its value is the boolean ``true``. Semantics chosen to fail closed:

- a condition that names an attribute absent from the request is false (as a whole);
- a comparison between values of different types (string, number, boolean) is false,
  whatever the operator, including ``!=``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from gateway.errors import ConfigError
from gateway.policy._glob import compile_glob

#: Attribute namespaces a condition may name; anything else is rejected at load.
ATTRIBUTE_PREFIXES = ("caller.", "model.", "request.", "anomaly.")

#: Types of the attributes the gateway is known to supply (others under the prefixes: any).
KNOWN_TYPES: dict[str, type] = {
    "caller.id": str,
    "caller.trust_domain": str,
    "caller.path": str,
    "caller.issuer": str,
    "caller.serial": str,
    "caller.cert_sha256": str,
    "model.name": str,
    "model.version": str,
    "model.owner": str,
    "request.batch_size": int,
    "request.input_bytes": int,
    "request.time": int,
    "request.hour": int,
}

_MAX_LENGTH = 2000
_MAX_DEPTH = 32

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
_SEGMENT = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_OPERATORS = ("==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "(", ")", ",")

Attributes = Mapping[str, object]


class ConditionError(ConfigError, ValueError):
    """A condition is not a well-formed expression over known attributes."""


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition: its canonical text, the attributes it reads, and its evaluator."""

    text: str
    attributes: tuple[str, ...]
    _fn: Callable[[Attributes], bool]

    def __call__(self, attrs: Attributes) -> bool:
        for name in self.attributes:
            if name not in attrs:
                return False
        return self._fn(attrs)

    def missing(self, attrs: Attributes) -> list[str]:
        """The attributes this condition needs that ``attrs`` lacks (for explain)."""
        return [name for name in self.attributes if name not in attrs]


def parse_condition(text: str) -> Condition:
    """Parse ``text``; raise :class:`ConditionError` saying what is wrong and where."""
    if len(text) > _MAX_LENGTH:
        raise ConditionError(f"condition longer than {_MAX_LENGTH} characters")
    parser = _Parser(_tokenize(text))
    node = parser.expr(0)
    extra = parser.peek()
    if extra is not None:
        _, value, col = extra
        raise ConditionError(f"unexpected {value!r} at column {col}"
                             + (" (unbalanced ')')" if value == ")" else ""))
    names = tuple(sorted(parser.names))
    return Condition(node.text, names, node.fn)


def attribute_problem(name: str) -> str | None:
    """Why ``name`` is not an attribute a condition or a test case may name (None: it is).

    The one check shared by the condition parser and the test-case loader, so a case cannot
    set an attribute no condition could ever read.
    """
    if not name.startswith(ATTRIBUTE_PREFIXES):
        return (f"unknown attribute {name!r}: attributes start with "
                + ", ".join(ATTRIBUTE_PREFIXES))
    for segment in name.split(".")[1:]:
        if not _SEGMENT.match(segment):
            return (f"bad attribute name {name!r}: segment {segment!r} must be lower-case "
                    "letters, digits, _ or -")
    if name.startswith("model.labels.") or not name.startswith(("caller.", "model.",
                                                                "request.")):
        return None
    if name not in KNOWN_TYPES:
        return (f"unknown attribute {name!r}{did_you_mean(name, KNOWN_TYPES)}; known: "
                + ", ".join(sorted(KNOWN_TYPES)) + ", model.labels.<label>, anomaly.<name>")
    return None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``; did you mean 'x'?`` naming the closest of ``choices``, or '' if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def attribute_kind(name: str) -> str | None:
    """``string``, ``number`` or ``boolean`` for attributes of a known type, else None."""
    known = KNOWN_TYPES.get(name)
    if known is None and name.startswith("model.labels."):
        known = str
    return None if known is None else _kind(known())


def value_kind(value: object) -> str:
    """The condition language's type of a Python value (``string``, ``number``, ...)."""
    return _kind(value)


# --- tokens -----------------------------------------------------------------------------

_Token = tuple[str, object, int]  # kind, value, column (1-based)


def _tokenize(text: str) -> Iterator[_Token]:
    """Tokens, lazily: the parser reports the first problem in reading order."""
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        col = i + 1
        if c in " \t":
            i += 1
            continue
        if c in "'\"":
            j = i + 1
            out = []
            while j < n and text[j] != c:
                if text[j] == "\\":
                    if j + 1 >= n or text[j + 1] not in ("\\", c):
                        raise ConditionError(f"bad escape in string at column {j + 1}")
                    j += 1
                out.append(text[j])
                j += 1
            if j >= n:
                raise ConditionError(f"unterminated string starting at column {col}")
            yield ("str", "".join(out), col)
            i = j + 1
            continue
        m = _NUMBER.match(text, i)
        if m and (c != "-" or m.end() > i + 1):
            raw = m.group()
            yield ("num", float(raw) if "." in raw else int(raw), col)
            i = m.end()
            continue
        m = _NAME.match(text, i)
        if m:
            yield ("name", m.group(), col)
            i = m.end()
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                yield ("op", op, col)
                i += len(op)
                break
        else:
            raise ConditionError(f"unexpected character {c!r} at column {col}")


# --- parser -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    text: str  # canonical rendering
    fn: Callable[[Attributes], bool]
    prec: int = 3  # 1: ||, 2: &&, 3: atom (decides where canonical text needs parentheses)


@dataclass(frozen=True, slots=True)
class _Value:
    text: str
    attribute: str | None  # None: a literal
    literal: object


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def _render_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


def _compare(op: str, a: object, b: object) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka != kb or ka == "other":
        return False
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if ka == "boolean":
        return False
    if op == "<":
        return a < b  # type: ignore[operator]
    if op == "<=":
        return a <= b  # type: ignore[operator]
    if op == ">":
        return a > b  # type: ignore[operator]
    return a >= b  # type: ignore[operator]


class _Parser:
    def __init__(self, tokens: Iterator[_Token]) -> None:
        self.source = tokens
        self.tokens: list[_Token] = []
        self.pos = 0
        self.names: set[str] = set()

    def peek(self) -> _Token | None:
        while self.pos >= len(self.tokens):
            tok = next(self.source, None)
            if tok is None:
                return None
            self.tokens.append(tok)
        return self.tokens[self.pos]

    def take(self) -> _Token:
        tok = self.peek()
        if tok is None:
            raise ConditionError("condition ends too early")
        self.pos += 1
        return tok

    def expect(self, value: str) -> None:
        tok = self.peek()
        if tok is None or tok[0] != "op" or tok[1] != value:
            where = f"{tok[1]!r} at column {tok[2]}" if tok else "the end"
            raise ConditionError(f"expected {value!r}, found {where}")
        self.pos += 1

    def at(self, value: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "op" and tok[1] == value

    def expr(self, depth: int) -> _Node:
        if depth > _MAX_DEPTH:
            raise ConditionError(f"condition nested deeper than {_MAX_DEPTH}")
        parts = [self.conj(depth)]
        while self.at("||"):
            self.pos += 1
            parts.append(self.conj(depth))
        if len(parts) == 1:
            return parts[0]
        fns = tuple(p.fn for p in parts)
        return _Node(" || ".join(p.text for p in parts),
                     lambda attrs: any(f(attrs) for f in fns), 1)

    def conj(self, depth: int) -> _Node:
        parts = [self.unary(depth)]
        while self.at("&&"):
            self.pos += 1
            parts.append(self.unary(depth))
        if len(parts) == 1:
            return parts[0]
        fns = tuple(p.fn for p in parts)
        texts = [f"({p.text})" if p.prec < 2 else p.text for p in parts]
        return _Node(" && ".join(texts), lambda attrs: all(f(attrs) for f in fns), 2)

    def unary(self, depth: int) -> _Node:
        if self.at("!"):
            self.pos += 1
            inner = self.unary(depth + 1)
            fn = inner.fn
            text = inner.text if inner.prec == 3 and " " not in inner.text else f"({inner.text})"
            return _Node(f"!{text}", lambda attrs: not fn(attrs))
        return self.primary(depth)

    def primary(self, depth: int) -> _Node:
        tok = self.peek()
        if tok is None:
            raise ConditionError("condition ends too early (empty expression)")
        if tok[0] == "op" and tok[1] == "(":
            self.pos += 1
            inner = self.expr(depth + 1)
            self.expect(")")
            return inner
        if tok[0] == "name" and tok[1] == "globMatch":
            return self.glob_call()
        left = self.value()
        nxt = self.peek()
        if nxt is not None and nxt[0] == "op" and nxt[1] in ("==", "!=", "<", "<=", ">", ">="):
            self.pos += 1
            right = self.value()
            return self.comparison(str(nxt[1]), left, right)
        if nxt is not None and nxt[0] == "name" and nxt[1] == "in":
            self.pos += 1
            return self.membership(left)
        if left.attribute is None:
            if isinstance(left.literal, bool):
                value = left.literal
                return _Node(left.text, lambda attrs: value)
            raise ConditionError(f"{left.text} is not a condition")
        name = left.attribute
        return _Node(name, lambda attrs: attrs.get(name) is True)

    def glob_call(self) -> _Node:
        self.pos += 1
        self.expect("(")
        subject = self.value()
        self.expect(",")
        tok = self.take()
        if tok[0] != "str":
            raise ConditionError(f"globMatch pattern must be a string literal (column {tok[2]})")
        self.expect(")")
        if subject.attribute is None:
            raise ConditionError("globMatch must test an attribute")
        pattern = str(tok[1])
        try:
            match = compile_glob(pattern).match
        except ValueError as err:
            raise ConditionError(f"globMatch pattern {pattern!r}: {err}") from None
        name = subject.attribute
        self.check_type(name, "string")

        def fn(attrs: Attributes) -> bool:
            value = attrs.get(name)
            return isinstance(value, str) and match(value)

        return _Node(f"globMatch({name}, {_render_literal(pattern)})", fn)

    def value(self) -> _Value:
        tok = self.take()
        kind, value, col = tok
        if kind in ("str", "num"):
            return _Value(_render_literal(value), None, value)
        if kind == "name":
            name = str(value)
            if name in ("true", "false"):
                return _Value(name, None, name == "true")
            nxt = self.peek()
            if nxt is not None and nxt[0] == "op" and nxt[1] == "(":
                raise ConditionError(f"calls are not allowed: {name}(...) at column {col}")
            self.check_attribute(name, col)
            self.names.add(name)
            return _Value(name, name, None)
        raise ConditionError(f"expected a value, found {value!r} at column {col}")

    def check_attribute(self, name: str, col: int) -> None:
        problem = attribute_problem(name)
        if problem is not None:
            raise ConditionError(f"{problem} (column {col})")

    def check_type(self, name: str, kind: str) -> None:
        expected = attribute_kind(name)
        if expected is not None and expected != kind:
            raise ConditionError(f"{name} is a {expected} attribute, compared with a {kind}")

    def comparison(self, op: str, left: _Value, right: _Value) -> _Node:
        if left.attribute is None and right.attribute is None:
            raise ConditionError(f"comparison of two constants: {left.text} {op} {right.text}")
        for side, other in ((left, right), (right, left)):
            if side.attribute is not None and other.attribute is None:
                self.check_type(side.attribute, _kind(other.literal))
        text = f"{left.text} {op} {right.text}"
        la, ll, ra, rl = left.attribute, left.literal, right.attribute, right.literal
        if la is not None and ra is None:
            return _Node(text, lambda attrs: _compare(op, attrs.get(la), rl))
        if la is None and ra is not None:
            return _Node(text, lambda attrs: _compare(op, ll, attrs.get(ra)))
        assert la is not None and ra is not None  # two constants are refused above
        return _Node(text, lambda attrs: _compare(op, attrs.get(la), attrs.get(ra)))

    def membership(self, left: _Value) -> _Node:
        if left.attribute is None:
            raise ConditionError("'in' must test an attribute")
        self.expect("(")
        items: list[object] = []
        while True:
            item = self.value()
            if item.attribute is not None:
                raise ConditionError("'in' lists hold only literals")
            self.check_type(left.attribute, _kind(item.literal))
            items.append(item.literal)
            if self.at(","):
                self.pos += 1
                continue
            self.expect(")")
            break
        name = left.attribute
        options = tuple(items)
        text = f"{name} in ({', '.join(_render_literal(v) for v in options)})"
        return _Node(text, lambda attrs: any(_compare("==", attrs.get(name), v) for v in options))
