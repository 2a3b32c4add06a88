"""Reading a policy directory: ``model.conf`` and ``policy.csv`` in casbin's formats, strictly.

Every problem is collected with its file and line (not only the first), so ``gateway policy
check`` can list them all. The model file must be one of the forms the compiled engine
implements exactly (see policies/README.md); anything else is rejected rather than
half-supported, because a silently ignored matcher clause is an authorization bug.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gateway.policy._model_conf import parse_model
from gateway.policy._policy_csv import parse_policy, split_fields
from gateway.policy._spec import (
    ACTIONS,
    CASES_DIR,
    GATEWAY_OBJECT,
    MODEL_FILE,
    POLICY_FILE,
    LinkSpec,
    ModelSpec,
    PolicyError,
    PolicySource,
    Problem,
    RuleSpec,
)

__all__ = ["ACTIONS", "CASES_DIR", "GATEWAY_OBJECT", "MODEL_FILE", "POLICY_FILE", "LinkSpec",
           "ModelSpec", "PolicyError", "PolicySource", "Problem", "RuleSpec", "digest_files",
           "parse_files", "parse_model", "parse_policy", "read_directory", "split_fields"]


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
