"""Tamper-evident audit log (stub: being built, see issue 5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AuditSettings:
    """Where the audit log lives and how it commits."""

    directory: Path = Path("var/audit")
