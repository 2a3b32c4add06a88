"""Findings and the scan report (kept apart so the CLI and the loader share one shape)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.errors import ModelUnavailable

Severity = Literal["low", "medium", "high"]
_ORDER = {"high": 0, "medium": 1, "low": 2}


@dataclass(frozen=True)
class Finding:
    """One thing the scanner found; ``code`` is stable (tests and policies match on it)."""

    severity: Severity
    code: str
    message: str
    file: str = "model.onnx"

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "message": self.message,
                "file": self.file}


@dataclass
class ScanReport:
    """Everything the scanner found in one model version directory.

    ``figures`` holds what was measured (declared initializer bytes, the largest inferred
    tensor, opsets) so an operator can see how close a model is to the limits.
    """

    path: str
    findings: list[Finding] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        """True when any finding is high: such a model must not be loaded."""
        return any(f.severity == "high" for f in self.findings)

    def codes(self) -> set[str]:
        """The distinct finding codes (convenient for tests and audit fields)."""
        return {f.code for f in self.findings}

    def add(self, severity: Severity, code: str, message: str, file: str = "model.onnx") -> None:
        self.findings.append(Finding(severity, code, message, file))

    def sorted_findings(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: (_ORDER[f.severity], f.code, f.file))

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "refused": self.refused,
                "findings": [f.to_json() for f in self.sorted_findings()],
                "figures": self.figures}

    def raise_if_refused(self) -> None:
        """Raise :class:`ModelRefused` naming every high finding (the loader's one-liner)."""
        if self.refused:
            raise ModelRefused(self)


class ModelRefused(ModelUnavailable):
    """The admission scanner refused the model; ``report`` says why.

    The message names the first high finding (what a caller sees); ``detail`` names the
    directory and lists every finding.
    """

    def __init__(self, report: ScanReport) -> None:
        self.report = report
        high = [f for f in report.sorted_findings() if f.severity == "high"]
        first = high[0]
        more = f" (and {len(high) - 1} more)" if len(high) > 1 else ""
        message = f"refused by the admission scanner: {first.code}: {first.message}{more}"
        lines = [f"model {report.path} {message}"]
        lines += [f"  {f.severity:<6} {f.code}: {f.file}: {f.message}"
                  for f in report.sorted_findings()]
        super().__init__(message, detail="\n".join(lines))
