"""Policy as code: casbin-format RBAC + ABAC, compiled, hot-reloaded, decided in microseconds.

    from gateway.policy import PolicyStore
    store = PolicyStore.load(Path("policies"), on_reload=audit_reload)
    d = store.decide("spiffe://demo.local/svc/scorer", "demo-mlp", "infer",
                     {"model.labels.stage": "production"})
    d.allowed, d.rule, d.policy_digest        # True, "policy.csv:7", "1ca5..."
    store.start_watching(1.0)                 # reload on file change (or call store.reload())

    # One policy for many replicas: the versions `gateway policy push` publishes to PostgreSQL
    # (gateway.policy.postgres), watched by LISTEN/NOTIFY; the same reload installs them.
    store = PolicyStore.open(open_source("postgresql", Path("policies"), dsn))

The policy directory holds ``model.conf`` and ``policy.csv`` in casbin's formats and
``tests/*.yaml`` cases that every reload must pass; the language (subjects, roles, objects,
actions, conditions, the deny-wins / default-deny rule) is documented in policies/README.md.
The API defined here is what the server uses; everything else is private.
"""

from gateway.policy._cases import Case, Report, load_cases, parse_cases, run_cases
from gateway.policy._condition import ATTRIBUTE_PREFIXES, attribute_problem, did_you_mean
from gateway.policy._engine import DEFAULT_DENY, Decision, Snapshot
from gateway.policy._lint import Finding, lint
from gateway.policy._settings import PolicySettings
from gateway.policy._shadow import ShadowCollector
from gateway.policy._source import (
    ACTIONS,
    GATEWAY_OBJECT,
    MODEL_FILE,
    POLICY_FILE,
    PolicyError,
    Problem,
)
from gateway.policy._store import (
    Bundle,
    DirectorySource,
    PolicyStore,
    ReloadResult,
    Source,
    SourceCollector,
    case_files,
    compile_bundle,
    compile_directory,
    open_source,
)
from gateway.policy._tools import (
    access_diff,
    compile_files,
    conditional_changes,
    explain,
    format_directory,
    load_revision,
    write_atomically,
)

__all__ = [
    "ACTIONS",
    "ATTRIBUTE_PREFIXES",
    "DEFAULT_DENY",
    "GATEWAY_OBJECT",
    "MODEL_FILE",
    "POLICY_FILE",
    "Bundle",
    "Case",
    "Decision",
    "DirectorySource",
    "Finding",
    "PolicyError",
    "PolicySettings",
    "PolicyStore",
    "Problem",
    "ReloadResult",
    "Report",
    "ShadowCollector",
    "Snapshot",
    "Source",
    "SourceCollector",
    "access_diff",
    "attribute_problem",
    "case_files",
    "compile_bundle",
    "compile_directory",
    "compile_files",
    "conditional_changes",
    "did_you_mean",
    "explain",
    "format_directory",
    "lint",
    "load_cases",
    "load_revision",
    "open_source",
    "parse_cases",
        "run_cases",
    "write_atomically",
]
