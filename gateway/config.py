"""Gateway configuration: one TOML file, every key documented, demo defaults built in.

    from gateway.config import load_config
    config = load_config("gateway.toml")   # or load_config(None) for the demo defaults

Each concern owns its settings dataclass (``ServerSettings`` here, ``AuditSettings`` in
:mod:`gateway.audit`, ...); this module only reads the file, rejects unknown keys and wrong
types by name, and resolves relative paths against the file's directory (or the working
directory for the built-in defaults), so a config behaves the same from wherever it is run.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError


@dataclass(frozen=True)
class ServerSettings:
    """The listener and request limits."""

    #: host:port of the mTLS gRPC listener. There is no plaintext listener.
    listen: str = "127.0.0.1:8443"
    #: Worker threads serving RPCs (each in-flight call holds one).
    workers: int = 16
    #: Largest request or response message, in bytes (RESOURCE_EXHAUSTED beyond).
    max_message_bytes: int = 64 * 1024 * 1024
    #: Largest number of elements in one input tensor (INVALID_ARGUMENT beyond).
    max_tensor_elements: int = 16 * 1024 * 1024
    #: Name of this gateway instance in audit records; empty means host name and port.
    instance_id: str = ""
    #: Unary calls one identity may have in progress while the server is backed up
    #: (``workers`` calls waiting for a worker; RESOURCE_EXHAUSTED beyond); otherwise it may
    #: use every idle worker.
    max_calls_per_identity: int = 8
    #: Streams (server reflection, health Watch) open at once, over all identities and per
    #: identity (RESOURCE_EXHAUSTED beyond). Streams never take more than half the workers,
    #: so unary calls always have the rest.
    max_streams: int = 4
    max_streams_per_identity: int = 2
    #: A stream with no message from the caller for this long, or open this long, is ended.
    stream_idle_seconds: float = 30.0
    stream_max_seconds: float = 300.0
    #: A unary call whose request message has not arrived this long after it opened is
    #: ended; at most this many calls of one client certificate (and half the workers in
    #: all) may wait for their message at once (RESOURCE_EXHAUSTED beyond).
    request_timeout_seconds: float = 10.0
    max_pending_requests_per_certificate: int = 4
    #: Refused calls (unauthenticated, denied, over a limit) recorded one by one per identity
    #: (or certificate): ``refusal_rate`` a second, bursts of ``refusal_burst``. Beyond it a
    #: refused call is answered RESOURCE_EXHAUSTED and counted into a summary record.
    refusal_rate: float = 5.0
    refusal_burst: int = 20
    #: Health checks are recorded once per identity per interval (the first); the rest, and
    #: the refusals over the rate above, are counted into one summary record per interval.
    summary_interval_seconds: float = 10.0

    def __post_init__(self) -> None:
        for name in ("workers", "max_calls_per_identity", "max_streams",
                     "max_streams_per_identity", "refusal_burst",
                     "max_pending_requests_per_certificate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[server] {name} must be at least 1")
        if self.max_streams > self.workers // 2:
            raise ConfigError(f"[server] max_streams ({self.max_streams}) must be at most half "
                              f"the workers ({self.workers}): unary calls need the rest")
        for name in ("stream_idle_seconds", "stream_max_seconds", "refusal_rate",
                     "summary_interval_seconds", "request_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[server] {name} must be positive")


@dataclass(frozen=True)
class TlsSettings:
    """Server certificate and the client-certificate trust rules (re-read on change)."""

    cert: Path = Path("certs/dev/server.pem")
    key: Path = Path("certs/dev/server.key")
    #: CA bundle client certificates must chain to.
    ca: Path = Path("certs/dev/ca.pem")
    #: SPIFFE trust domains whose identities are accepted (lower case).
    trust_domains: tuple[str, ...] = ("demo.local",)
    #: Issuer distinguished names (RFC 4514) whose CN-only certificates map to ``cn:<name>``.
    cn_issuers: tuple[str, ...] = ()
    #: SPIFFE trust bundles: trust domain -> its own CA bundle file. A certificate whose
    #: SPIFFE ID names a domain listed here must chain to that domain's bundle (another
    #: domain's CA cannot mint its identities); listed domains are accepted. Domains only
    #: in ``trust_domains`` use ``ca``.
    trust_bundles: dict[str, Path] = field(default_factory=dict, hash=False)
    #: /metrics over TLS with this server certificate, requiring a client certificate that
    #: chains to ``ca``: "on", "off", or "auto" (on unless metrics listen on loopback).
    metrics_tls: str = "auto"

    def __post_init__(self) -> None:
        if self.metrics_tls not in ("auto", "on", "off"):
            raise ConfigError(f"[tls] metrics_tls must be auto, on or off, not "
                              f"{self.metrics_tls!r}")
        shared = sorted(set(self.trust_domains) - set(self.trust_bundles))
        if len(shared) > 1:
            raise ConfigError(
                f"[tls] trust domains {', '.join(shared)} would all be vouched for by any CA "
                f"in {self.ca.name}: map each to its own bundle in [tls] trust_bundles")


@dataclass(frozen=True)
class ModelSettings:
    """The model repository: ``<repository>/<name>/<version>/model.onnx``."""

    repository: Path = Path("models")
    #: ONNX Runtime threads per session; bounded so one model cannot take every core.
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    #: Seconds between re-verifications of every loaded model's files (0 disables);
    #: a model that no longer verifies is taken out of service.
    reverify_interval: float = 60.0


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


@dataclass(frozen=True)
class GatewayConfig:
    """The whole configuration; ``source`` is the file it came from (None: defaults)."""

    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    audit: Any = None
    monitor: Any = None
    signing: Any = None
    scan: Any = None
    explain: Any = None
    robustness: Any = None
    client: Any = None
    source: Path | None = None


def _sections() -> dict[str, type]:
    # Imported here so that `gateway.config` stays importable by every package it configures.
    from gateway.audit import AuditSettings
    from gateway.client import ClientSettings
    from gateway.explain import ExplainSettings
    from gateway.models.robustness import RobustnessSettings
    from gateway.models.scan import ScanSettings
    from gateway.models.signing import SigningSettings
    from gateway.monitor import MonitorSettings

    return {
        "server": ServerSettings,
        "tls": TlsSettings,
        "models": ModelSettings,
        "policy": PolicySettings,
        "audit": AuditSettings,
        "monitor": MonitorSettings,
        "signing": SigningSettings,
        "scan": ScanSettings,
        "explain": ExplainSettings,
        "robustness": RobustnessSettings,
        "client": ClientSettings,
    }


def load_config(path: str | Path | None = None) -> GatewayConfig:
    """Read ``path`` (TOML) or, with None, return the demo defaults rooted at the working dir."""
    if path is None:
        table: dict[str, Any] = {}
        base = Path.cwd()
        source = None
    else:
        source = Path(path).resolve()
        try:
            table = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: no such configuration file") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
        base = source.parent
    sections = _sections()
    unknown = sorted(set(table) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sections)}")
    built = {name: parse_section(cls, table.get(name, {}), base, f"{path}: [{name}]")
             for name, cls in sections.items()}
    return GatewayConfig(**built, source=source)


def parse_section(cls: type, table: dict[str, Any], base: Path, where: str) -> Any:
    """Build settings dataclass ``cls`` from a TOML table, checking names and types.

    Relative ``Path`` fields, including defaults, are resolved against ``base``.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in table:
            value = _coerce(hints[name], table[name], f"{where} {name}")
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"{where}: missing required key {name}")
        values[name] = _resolve_paths(value, base)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(item, v, where) for v in value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path string")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    if dataclasses.is_dataclass(hint):
        return parse_section(hint, value, Path("."), where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        item = typing.get_args(hint)[1]
        return value if item is Any else {k: _coerce(item, v, f"{where}.{k}")
                                          for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported setting type {hint}")


def _resolve_paths(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else (base / value)
    if isinstance(value, tuple):
        return tuple(_resolve_paths(v, base) for v in value)
    if isinstance(value, dict):
        return {k: _resolve_paths(v, base) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _resolve_paths(getattr(value, f.name), base)
                                             for f in dataclasses.fields(value) if f.init})
    return value
