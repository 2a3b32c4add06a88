"""The compiled policy: an immutable, indexed snapshot that decides in microseconds.

Why not casbin on the request path: pycasbin scans every rule per request (a cost per line;
bench/README.md has the figures), re-parses its matcher per call (not thread safe: CPython
gh-106905) and mutates its role manager in place on reload. A :class:`Snapshot` is built once
per policy version and not mutated while it is live, so any number of threads may call
:meth:`Snapshot.decide` while another thread compiles the next one; the store swaps snapshots by
one reference assignment (and dismantles the old one afterwards, see :meth:`Snapshot.retire`).

Indexes (all built at compile time), so a decision costs about the same at 100 and at
100,000 rules:

- role closure: subject -> (subject, every role it holds transitively), so ``g`` costs one
  dict lookup instead of a graph walk;
- exact objects: (action, subject-or-role, model name) -> rules;
- wildcard objects: (action, subject-or-role) -> {literal prefix: rules}, probed with the
  model name's prefixes of the lengths present, so only patterns that could match are tried.

Semantics (policies/README.md): a matching deny wins over any allow; with no matching rule
the request is denied (``default-deny``), whatever effect the model file names. The deciding
rule is the matching deny with the lowest line, else the matching allow with the lowest line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.policy._condition import Attributes
from gateway.policy._source import ACTIONS, GATEWAY_OBJECT, LinkSpec, PolicySource, RuleSpec

_EMPTY: Mapping[str, object] = {}
DEFAULT_DENY = "default-deny"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request: allowed or not, which rule decided, under which policy."""

    allowed: bool
    rule: str
    policy_digest: str


# A compiled rule, as the hot path sees it: (index, deny, decision, name_match, guard).
# A plain tuple: cheap to build 100k times per reload and to read per request. ``guard`` is
# None or a callable over the attributes (version pattern and/or condition).
_Rule = tuple[int, bool, Decision, Callable[[str], bool], Callable[[Attributes], bool] | None]


def _guard(spec: RuleSpec) -> Callable[[Attributes], bool] | None:
    version, cond = spec.version, spec.cond
    if version is None:
        return cond
    vmatch = version.match

    def guard(attrs: Attributes) -> bool:
        v = attrs.get("model.version")
        return isinstance(v, str) and vmatch(v) and (cond is None or cond(attrs))

    return guard


class Snapshot:
    """One compiled policy version, immutable once built (until :meth:`retire`)."""

    def __init__(self, source: PolicySource) -> None:
        self.source = source
        self.digest = digest = source.digest
        self.retired = False
        self.default = Decision(False, DEFAULT_DENY, digest)
        self.attributes = frozenset(a for r in source.rules if r.cond for a in r.cond.attributes)
        if any(r.version is not None for r in source.rules):
            self.attributes |= {"model.version"}
        # Every prefix of every attribute read, so references(prefix) is one set lookup.
        self.prefixes = frozenset(name[:i] for name in self.attributes
                                  for i in range(len(name) + 1))
        self._parents: dict[str, list[LinkSpec]] = {}
        for link in source.links:
            self._parents.setdefault(link.member, []).append(link)
        self._roles = {member: self._closure(member) for member in self._parents}
        self._actions = frozenset(ACTIONS)
        # Exact model names: (action, subject-or-role, model) -> rules.
        exact: dict[tuple[str, str, str], tuple[_Rule, ...]] = {}
        # Wildcard patterns: (action, subject-or-role) -> {literal prefix: rules}.
        wild: dict[tuple[str, str], dict[str, tuple[_Rule, ...]]] = {}
        rules: list[_Rule] = []
        for spec in source.rules:
            rule = (spec.index, spec.deny, Decision(not spec.deny, spec.where, digest),
                    spec.name.match, _guard(spec))
            rules.append(rule)
            name = spec.name.exact
            for action in spec.actions:
                if name is not None:
                    key = (action, spec.sub, name)
                    found = exact.get(key)
                    exact[key] = (rule,) if found is None else (*found, rule)
                else:
                    by_prefix = wild.get((action, spec.sub))
                    if by_prefix is None:
                        by_prefix = wild[(action, spec.sub)] = {}
                    found = by_prefix.get(spec.name.prefix)
                    by_prefix[spec.name.prefix] = (rule,) if found is None else (*found, rule)
        self._rules = rules
        self._exact = exact
        # Per (action, role): the distinct prefix lengths, so decide slices the name once each.
        self._wild = {key: (tuple(sorted({len(p) for p in by_prefix})), by_prefix)
                      for key, by_prefix in wild.items()}

    def _closure(self, member: str) -> tuple[str, ...]:
        seen = {member: None}
        stack = [member]
        while stack:
            for link in self._parents.get(stack.pop(), ()):
                if link.role not in seen:
                    seen[link.role] = None
                    stack.append(link.role)
        return tuple(seen)

    def roles_of(self, subject: str) -> tuple[str, ...]:
        """The subject and every role it holds, directly or through other roles."""
        return self._roles.get(subject) or (subject,)

    def decide(self, subject: str, model: str, action: str,
               attributes: Attributes | None = None) -> Decision:
        """Decide one request. Lock-free and allocation-light: this is the request path."""
        if action not in self._actions:
            return self.default
        if not model or model == "*":
            model = GATEWAY_OBJECT
        attrs = _EMPTY if attributes is None else attributes
        deny: _Rule | None = None
        allow: _Rule | None = None
        exact = self._exact
        wild = self._wild
        size = len(model)
        for role in self._roles.get(subject) or (subject,):
            found = exact.get((action, role, model))
            if found is not None:
                for rule in found:
                    if rule[4] is not None and not rule[4](attrs):
                        continue
                    if rule[1]:
                        if deny is None or rule[0] < deny[0]:
                            deny = rule
                    elif allow is None or rule[0] < allow[0]:
                        allow = rule
            patterns = wild.get((action, role))
            if patterns is None:
                continue
            lens, by_prefix = patterns
            for length in lens:
                if length > size:
                    break
                found = by_prefix.get(model[:length])
                if found is None:
                    continue
                # The same precedence as the exact rules above, written out again on purpose:
                # this loop is the decision hot path, and a helper call per rule would cost
                # more than the rule check itself.
                for rule in found:
                    if not rule[3](model):
                        continue
                    if rule[4] is not None and not rule[4](attrs):
                        continue
                    if rule[1]:
                        if deny is None or rule[0] < deny[0]:
                            deny = rule
                    elif allow is None or rule[0] < allow[0]:
                        allow = rule
        if deny is not None:
            return deny[2]
        if allow is not None:
            return allow[2]
        return self.default

    def retire(self) -> None:
        """Mark this snapshot replaced, then take it apart in small pieces.

        Why: dropping 100k rules at once frees ~10^6 objects in one C call chain that holds
        the GIL for hundreds of milliseconds, stalling every request. Freed piece by piece,
        the interpreter can switch threads between pieces. A decision still running on this
        snapshot may see it half-dismantled, so :class:`PolicyStore` re-checks ``retired``
        after each decision and re-decides on the live snapshot if it is set (the flag is
        set before the first piece is removed).
        """
        self.retired = True
        done = 0
        for table in (self._exact, self._wild, self._roles, self._parents):
            while table:
                table.popitem()  # not list(table): freeing that list of keys is one long call
                done += 1
                if done % 2048 == 0:
                    time.sleep(0.0002)  # pace the freeing: leave the GIL to request threads
        for items in (self._rules, self.source.rules, self.source.links):
            while items:
                del items[-2048:]
                time.sleep(0.0002)

    # --- the slow path, for explain, coverage and diff (never on the request path) -------

    def role_path(self, subject: str, role: str) -> list[LinkSpec] | None:
        """The chain of g links by which ``subject`` holds ``role`` ([] if it is itself)."""
        if subject == role:
            return []
        prev: dict[str, LinkSpec | None] = {subject: None}
        queue = [subject]
        while queue:
            node = queue.pop(0)
            for link in self._parents.get(node, ()):
                if link.role in prev:
                    continue
                prev[link.role] = link
                if link.role == role:
                    path = [link]
                    while path[0].member != subject:
                        path.insert(0, prev[path[0].member])  # type: ignore[arg-type]
                    return path
                queue.append(link.role)
        return None

    def evaluate(self, subject: str, model: str, action: str,
                 attributes: Attributes | None = None) -> list[tuple[RuleSpec, list[str]]]:
        """Every rule with the list of reasons it does not match (empty: it matches)."""
        if not model or model == "*":
            model = GATEWAY_OBJECT
        attrs = _EMPTY if attributes is None else attributes
        held = set(self.roles_of(subject))
        out = []
        for spec in self.source.rules:
            why: list[str] = []
            if spec.sub not in held:
                why.append(f"subject: {subject} does not hold {spec.sub}")
            if action not in spec.actions:
                why.append(f"action: {action} is not {spec.act}")
            if not spec.name.match(model):
                why.append(f"model: {model} does not match {spec.name.source}")
            if spec.version is not None:
                version = attrs.get("model.version")
                if not isinstance(version, str) or not spec.version.match(version):
                    why.append(f"version: {version!r} does not match {spec.version.source}")
            if spec.cond is not None:
                missing = spec.cond.missing(attrs)
                if missing:
                    why.append(f"condition: attribute(s) {', '.join(missing)} not given")
                elif not spec.cond(attrs):
                    why.append(f"condition: {spec.cond.text} is false")
            out.append((spec, why))
        return out

    def subjects(self) -> set[str]:
        """Every subject and role the policy names."""
        names = {spec.sub for spec in self.source.rules}
        for link in self.source.links:
            names.add(link.member)
            names.add(link.role)
        return names
