"""Settings of explanations (the ``[explain]`` table of the gateway configuration)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExplainSettings:
    """Budgets and limits for the Explain RPC."""

    #: Model evaluations each caller may spend on explanations per window.
    budget_evaluations: int = 100_000
    #: Seconds over which a caller's budget refills.
    budget_window_seconds: float = 3600.0
    #: Largest number of input features an explanation may have.
    max_features: int = 4096
    #: Largest KernelSHAP sample count a request may ask for.
    max_samples: int = 16384
    #: Rows per model run while explaining.
    batch_size: int = 256
