"""The object and action matchers a model file may name: ``==``, ``keyMatch``, ``globMatch``.

Each pattern compiles to a :class:`Pattern` with the literal prefix every match starts with,
so the compiled policy can index patterns by prefix and test only the few that could match.

- ``keyMatch`` is casbin's ``KeyMatch``: a ``*`` matches any suffix; casbin ignores whatever
  follows the first ``*``, so such patterns are rejected here instead of silently truncated.
- ``globMatch`` is the shell/``path.Match`` glob casbin documents: ``*`` matches any run of
  characters except ``/``, ``?`` one character except ``/``, ``[a-z]``/``[!a-z]`` a class,
  ``\\x`` a literal ``x``. (pycasbin 1.43's ``glob_match`` skips the character right after a
  ``*`` that is not the last one, so ``d*x*p`` matches ``demo-mlp`` there; we do not copy that
  bug: see policies/README.md.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_SPECIAL = re.compile(r"[*?\[\\]")


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled pattern; ``exact`` is set when it has no wildcard."""

    source: str
    prefix: str
    exact: str | None
    match: Callable[[str], bool]


def compile_pattern(kind: str, pattern: str) -> Pattern:
    """Compile ``pattern`` for matcher ``kind`` (``eq``, ``key`` or ``glob``)."""
    if kind == "eq":
        return Pattern(pattern, pattern, pattern, pattern.__eq__)
    if kind == "key":
        return compile_key(pattern)
    if kind == "glob":
        return compile_glob(pattern)
    raise ValueError(f"unknown matcher kind {kind}")


def compile_key(pattern: str) -> Pattern:
    """casbin ``keyMatch``: ``prefix*`` matches every string starting with ``prefix``."""
    star = pattern.find("*")
    if star == -1:
        return Pattern(pattern, pattern, pattern, pattern.__eq__)
    if star != len(pattern) - 1:
        raise ValueError("keyMatch ignores everything after the first '*'; "
                         "put '*' last or use globMatch")
    prefix = pattern[:-1]
    return Pattern(pattern, prefix, None, lambda s: s.startswith(prefix))


def compile_glob(pattern: str) -> Pattern:
    """Shell-style glob (see module docstring); raises ValueError on a malformed class."""
    special = _SPECIAL.search(pattern)
    if special is None:
        return Pattern(pattern, pattern, pattern, pattern.__eq__)
    if special.start() == len(pattern) - 1 and pattern[-1] == "*":  # "prefix*": no regex
        prefix = pattern[:-1]
        start = len(prefix)
        return Pattern(pattern, prefix, None,
                       lambda s: s.startswith(prefix) and s.find("/", start) == -1)
    regex: list[str] = []
    literal: list[str] = []  # literal prefix, while no wildcard has been seen
    wild = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            wild = True
            regex.append("[^/]*")
        elif c == "?":
            wild = True
            regex.append("[^/]")
        elif c == "[":
            wild = True
            cls, i = _char_class(pattern, i)
            regex.append(cls)
        else:
            if c == "\\":
                if i == n:
                    raise ValueError("pattern ends with a lone '\\'")
                c = pattern[i]
                i += 1
            regex.append(re.escape(c))
            if not wild:
                literal.append(c)
    prefix = "".join(literal)
    if not wild:
        return Pattern(pattern, prefix, prefix, prefix.__eq__)
    compiled = re.compile("".join(regex), re.DOTALL)
    fullmatch = compiled.fullmatch
    return Pattern(pattern, prefix, None, lambda s: fullmatch(s) is not None)


def _char_class(pattern: str, i: int) -> tuple[str, int]:
    n = len(pattern)
    negate = i < n and pattern[i] in "!^"
    if negate:
        i += 1
    parts: list[str] = []
    while True:
        if i == n:
            raise ValueError("unterminated '[' class")
        c = pattern[i]
        i += 1
        if c == "]" and parts:
            break
        if c == "]":
            raise ValueError("empty '[]' class")
        if c == "\\":
            if i == n:
                raise ValueError("unterminated '[' class")
            c = pattern[i]
            i += 1
        if i + 1 < n and pattern[i] == "-" and pattern[i + 1] != "]":
            hi = pattern[i + 1]
            i += 2
            if hi == "\\":
                if i == n:
                    raise ValueError("unterminated '[' class")
                hi = pattern[i]
                i += 1
            if hi < c:
                raise ValueError(f"bad range {c}-{hi}")
            parts.append(f"{re.escape(c)}-{re.escape(hi)}")
        else:
            parts.append(re.escape(c))
    body = "".join(parts)
    # A class never matches '/', as in casbin.
    return (f"(?![/])[^{body}]" if negate else f"(?![/])[{body}]"), i
