"""``[policy]``: where the Casbin model and policy live and how changes are picked up.

Read by :func:`gateway.config.load_config`; it lives here so the policy package owns its
settings without importing the config loader, which sits above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError


@dataclass(frozen=True)
class PolicySettings:
    """Where the Casbin model and policy live, and whether file changes reload them."""

    directory: Path = Path("policies")
    watch: bool = True
    #: Seconds between checks of the policy files for changes.
    watch_interval: float = 1.0
    #: A candidate policy directory decided beside the live one (shadow mode): answers follow
    #: the live policy, disagreements go to metrics and the audit log. Also set or cleared at
    #: run time with `gateway policy shadow` (PolicyAdmin.SetShadowPolicy).
    shadow: Path | None = None
    #: The only directory tree a shadow policy may be loaded from at run time
    #: (PolicyAdmin.SetShadowPolicy names a path on the gateway's host: anything outside this
    #: tree is refused before the file system is looked at). Default: the directory that holds
    #: ``directory``.
    shadow_root: Path | None = None
    #: Seconds between audit summaries of shadow disagreements (only when there are new ones).
    shadow_summary_interval: float = 60.0
    #: Where the live policy comes from: "files" (``directory``, watched for changes) or
    #: "postgresql" (the versions ``gateway policy push`` publishes, shared by every replica;
    #: see "Running several replicas" in the README). ``watch_interval`` is then the polling
    #: backstop beside LISTEN/NOTIFY.
    source: str = "files"
    #: PostgreSQL DSN for source "postgresql"; empty: the environment variable GATEWAY_DSN.
    dsn: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("files", "postgresql"):
            raise ConfigError(f"[policy] source must be \"files\" or \"postgresql\", "
                              f"not {self.source!r}")

    def shadow_root_path(self) -> Path:
        """``shadow_root``, or the directory that holds the policy directory."""
        return (self.shadow_root or Path(self.directory).absolute().parent).resolve()
