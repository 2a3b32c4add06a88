"""``gateway policy explain``: why a request is allowed or denied, and what nearly matched.

Runs on the slow, exhaustive path (:meth:`Snapshot.evaluate`) so it can say *why*; the
request path never calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.policy._condition import Attributes
from gateway.policy._engine import Decision, Snapshot
from gateway.policy._spec import POLICY_FILE, LinkSpec, RuleSpec


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
        data: dict[str, Any] = self.to_dict(snapshot, subject, where)
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
