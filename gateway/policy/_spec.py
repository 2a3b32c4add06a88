"""The policy's vocabulary and parsed form: file names, actions, problems, rules and links.

Shared by the two file parsers (``_model_conf.py``, ``_policy_csv.py``), the compiler and the
tools; :mod:`gateway.policy._source` reads a directory into these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.errors import ConfigError
from gateway.policy._condition import Condition
from gateway.policy._glob import Pattern

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

    index: int  # type: ignore[assignment]  # shadows tuple.index: the rule's position
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
