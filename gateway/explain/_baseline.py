"""The default baseline of an explanation: the mean input of the model's reference profile."""

from __future__ import annotations

import json

import numpy as np

from gateway.models import LoadedModel
from gateway.monitor import PROFILE_FILE


def profile_baseline(model: LoadedModel) -> np.ndarray | None:
    """The per-feature mean of the model's reference profile, if it has one.

    The profile is the verified ``profile.json`` beside the model (written by
    ``gateway model profile``; its ``mean`` is per feature, flattened), so the default
    baseline is "an average input" rather than zeros, which may be far from any real input.
    """
    raw = model.extras.get(PROFILE_FILE)
    if raw is None:
        return None
    try:
        mean = json.loads(raw).get("mean")
        return None if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError, AttributeError):
        return None
