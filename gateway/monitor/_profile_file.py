"""Where a model version keeps its reference profile, and the one way to read it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gateway.monitor._profile import InputProfile

#: The profile's file name in a model version directory (covered by the model's signature).
PROFILE_FILE = "profile.json"


def load_profile(version_dir: str | Path) -> InputProfile | None:
    """The model version's ``profile.json`` if present (None: the model is not profiled).

    Load it only after the version's signature verified, as for the model itself: the
    profile sets the thresholds policy decides on. Raises :class:`ProfileError` if malformed.
    """
    path = Path(version_dir) / PROFILE_FILE
    return InputProfile.load(path) if path.exists() else None


def verified_profile(extras: Mapping[str, bytes]) -> InputProfile | None:
    """The profile among a loaded model's verified files (``LoadedModel.extras``), if any.

    Raises :class:`ProfileError` if malformed.
    """
    raw = extras.get(PROFILE_FILE)
    return None if raw is None else InputProfile.from_json(raw)
