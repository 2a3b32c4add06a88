"""Gateway configuration: one TOML file, every key documented, demo defaults built in.

    from gateway.config import load_config
    config = load_config("gateway.toml")   # or load_config(None) for the demo defaults

Each package owns its settings dataclass, in a small settings module exported from the
package (``TlsSettings`` in :mod:`gateway.identity`, ``PolicySettings`` in
:mod:`gateway.policy`, ``AuditSettings`` in :mod:`gateway.audit`, ...), so no domain package
imports this module, which sits above them. Two stay here: ``ServerSettings``, because the
server package sits above this module, and ``ModelSettings`` until the model repository's
rework settles. This module only reads the file, rejects unknown keys and wrong types by name,
and resolves relative paths against the file's directory (or the working directory for the
built-in defaults), so a config behaves the same from wherever it is run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.errors import ConfigError

__all__ = ["GatewayConfig", "ModelSettings", "PolicySettings", "ServerSettings", "TlsSettings",
           "load_config", "load_section", "parse_section", "section_classes"]


if TYPE_CHECKING:
    # The settings classes, for the annotations of GatewayConfig only: at run time they are
    # imported when a whole configuration is built (section_classes), so a verb that reads
    # one section (load_section) does not import every domain package and what they pull in
    # (ONNX Runtime, numpy, grpc).
    from _typeshed import DataclassInstance

    from gateway.audit import AuditSettings
    from gateway.client import ClientSettings
    from gateway.explain import ExplainSettings
    from gateway.identity import TlsSettings
    from gateway.models.robustness import RobustnessSettings
    from gateway.models.scan import ScanSettings
    from gateway.models.signing import SigningSettings
    from gateway.monitor import MonitorSettings
    from gateway.policy import PolicySettings
    from gateway.state import StateSettings

Section = TypeVar("Section", bound="DataclassInstance")

@dataclass(frozen=True)
class ServerSettings:
    """The listener and request limits.

    Two numbers size a server process: ``threads``, the handler threads that run calls, and
    ``workers``, the calls in flight it treats as ordinary load (the scale of its queues).
    The limits that promise other callers a thread are checked against ``threads`` here,
    so a configuration where streams, slow reads or one identity could hold every thread
    is refused at start, not discovered under attack:

    - a stream (server reflection) holds a thread for its lifetime: ``max_streams`` <=
      ``threads`` // 2;
    - calls still waiting for their request message hold one each: at most
      :attr:`slow_reads` in all, half of what streams leave, so streams and slow reads
      together always leave unary calls at least a quarter of the threads, and one;
    - one identity, while the server is backed up, runs at most ``max_calls_per_identity``
      unary calls: <= ``threads`` // 2, its share, the rest for the other callers.

    A stream slot is taken only once policy allowed the stream (reflection needs
    ``reflect``), so a caller without that grant holds threads only through slow reads.
    """

    #: host:port of the mTLS gRPC listener. There is no plaintext listener.
    listen: str = "127.0.0.1:8443"
    #: Handler threads of each process (each running call holds one). Fewer threads than
    #: callers cost less CPU per call: a thread that finishes takes the next queued call
    #: without sleeping, and fewer threads contend for the interpreter (bench/README.md).
    #: Not derived from the CPUs: one process runs Python on one core at a time, and
    #: ``processes`` already grows with the CPUs.
    threads: int = 6
    #: Calls in flight each process treats as ordinary load: with this many or more waiting
    #: for a thread it is *backed up* (``max_calls_per_identity`` applies); throttled
    #: connections may have 4 x this many calls waiting, and gRPC refuses calls beyond
    #: 8 x this many in flight (RESOURCE_EXHAUSTED). It sizes queues, not threads.
    workers: int = 16
    #: Largest request or response message, in bytes (RESOURCE_EXHAUSTED beyond).
    max_message_bytes: int = 64 * 1024 * 1024
    #: Largest number of elements in one input tensor (INVALID_ARGUMENT beyond).
    max_tensor_elements: int = 16 * 1024 * 1024
    #: Name of this gateway instance in audit records; empty means host name and port.
    #: Worker processes add ``/w<k>`` (and their hub ``/hub``) to it.
    instance_id: str = ""
    #: Processes serving the port (SO_REUSEPORT): a supervisor, a hub owning the audit log and
    #: the shared state, and this many workers. Default: the CPUs this process may use.
    #: 1 is a single process (no supervisor, no hub).
    processes: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    #: Worker processes' Unix sockets (audit log, shared state) and metrics files; mode 0700.
    runtime_dir: Path = Path("var/run")
    #: Unary calls one identity may have running while the server is backed up (``workers``
    #: calls waiting for a thread; RESOURCE_EXHAUSTED beyond); otherwise it may use every
    #: idle thread. At most half the threads.
    max_calls_per_identity: int = 3
    #: Streams (server reflection, health Watch) open at once, over all identities and per
    #: identity (RESOURCE_EXHAUSTED beyond). At most half the threads: a reflection stream
    #: holds one for its lifetime (a health Watch holds none: grpc answers it without one).
    max_streams: int = 2
    max_streams_per_identity: int = 2
    #: A stream with no message from the caller for this long, or open this long, is ended.
    stream_idle_seconds: float = 30.0
    stream_max_seconds: float = 300.0
    #: A unary call whose request message has not arrived this long after it opened is
    #: ended; at most this many calls of one client certificate (and :attr:`slow_reads` in
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
        for name in ("threads", "workers", "processes", "max_calls_per_identity",
                     "max_streams", "max_streams_per_identity", "refusal_burst",
                     "max_pending_requests_per_certificate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[server] {name} must be at least 1")
        for name, holder in (("max_streams", "streams hold one each"),
                             ("max_calls_per_identity", "the other callers need the rest")):
            if getattr(self, name) > self.threads // 2:
                raise ConfigError(f"[server] {name} ({getattr(self, name)}) must be at most "
                                  f"half the threads ({self.threads}): {holder}, and unary "
                                  "calls must always find one")
        for name in ("stream_idle_seconds", "stream_max_seconds", "refusal_rate",
                     "summary_interval_seconds", "request_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[server] {name} must be positive")

    @property
    def slow_reads(self) -> int:
        """Calls that may wait for their request message past the grace period, in all:
        half the threads that ``max_streams`` leaves (0 with a single one left: then no call
        may wait), so streams and slow reads together never hold every thread."""
        return (self.threads - self.max_streams) // 2


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
    #: Large model files (16 MiB and more) are copied into a private directory made under
    #: this one (best a tmpfs) and hashed there, and ONNX Runtime maps that copy: faster than
    #: handing it the bytes from memory (gateway/models/README.md). ``stage_files = false``,
    #: or a directory that cannot be written, loads every file from memory.
    staging_dir: Path = Path("/dev/shm")  # noqa: S108 - a private mkdtemp is made under it
    stage_files: bool = True


@functools.cache
def section_classes() -> Mapping[str, type[DataclassInstance]]:
    """Each TOML section and the settings class it is read into: the fields of GatewayConfig,
    in order. Imports every domain package's settings module, so only the callers that build
    a whole configuration use it."""
    from gateway.audit import AuditSettings
    from gateway.client import ClientSettings
    from gateway.explain import ExplainSettings
    from gateway.identity import TlsSettings
    from gateway.models.robustness import RobustnessSettings
    from gateway.models.scan import ScanSettings
    from gateway.models.signing import SigningSettings
    from gateway.monitor import MonitorSettings
    from gateway.policy import PolicySettings
    from gateway.state import StateSettings

    classes = (AuditSettings, ClientSettings, ExplainSettings, TlsSettings, RobustnessSettings,
               ScanSettings, SigningSettings, MonitorSettings, PolicySettings, StateSettings)
    hints = typing.get_type_hints(GatewayConfig, localns={c.__name__: c for c in classes})
    return types.MappingProxyType(
        {name: hint for name, hint in hints.items() if name != "source"})


def __getattr__(name: str) -> Any:
    """``PolicySettings`` and ``TlsSettings``, re-exported from their packages when asked."""
    if name in ("PolicySettings", "TlsSettings"):
        return section_classes()["policy" if name == "PolicySettings" else "tls"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default(name: str) -> Any:
    """The default factory of section ``name``: its class, imported when first called."""
    return lambda: section_classes()[name]()


@dataclass(frozen=True)
class GatewayConfig:
    """The whole configuration; ``source`` is the file it came from (None: defaults)."""

    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TlsSettings = field(default_factory=_default("tls"))
    models: ModelSettings = field(default_factory=ModelSettings)
    policy: PolicySettings = field(default_factory=_default("policy"))
    audit: AuditSettings = field(default_factory=_default("audit"))
    monitor: MonitorSettings = field(default_factory=_default("monitor"))
    signing: SigningSettings = field(default_factory=_default("signing"))
    scan: ScanSettings = field(default_factory=_default("scan"))
    explain: ExplainSettings = field(default_factory=_default("explain"))
    robustness: RobustnessSettings = field(default_factory=_default("robustness"))
    client: ClientSettings = field(default_factory=_default("client"))
    state: StateSettings = field(default_factory=_default("state"))
    source: Path | None = None


#: The TOML sections, in the order of GatewayConfig's fields (names only: no import).
SECTION_NAMES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GatewayConfig) if f.name != "source")


def load_config(path: str | Path | None = None) -> GatewayConfig:
    """Read ``path`` (TOML) or, with None, return the demo defaults rooted at the working dir."""
    table, base, source = _read(path)
    # One settings object per section, each of its own class (checked by parse_section).
    built: dict[str, Any] = {
        name: parse_section(cls, table.get(name, {}), base, f"{path}: [{name}]")
        for name, cls in section_classes().items()}
    return GatewayConfig(**built, source=source)


def load_section(path: str | Path | None, name: str, cls: type[Section]) -> Section:
    """Section ``name`` of ``path`` (or of the demo defaults), read into ``cls``, its class.

    For the verbs that need one section (the auditor's tools read ``[audit]``): the file is
    read and its section names checked as by :func:`load_config`, and this section's keys
    and types; the other sections are checked by the verbs that use them (``serve`` checks
    every one before it starts). ``cls`` comes from the caller, so only its package is
    imported.
    """
    annotation = GatewayConfig.__annotations__.get(name)
    if name not in SECTION_NAMES or annotation not in (cls.__name__, cls):
        raise TypeError(f"[{name}] is not read into {cls.__name__}")
    table, base, _ = _read(path)
    return parse_section(cls, table.get(name, {}), base, f"{path}: [{name}]")


def _read(path: str | Path | None) -> tuple[dict[str, Any], Path, Path | None]:
    """The TOML table of ``path`` (empty for the defaults), the directory relative paths
    resolve against, and the resolved file; ConfigError for an unknown section."""
    if path is None:
        return {}, Path.cwd(), None
    source = Path(path).resolve()
    try:
        table = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such configuration file") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    unknown = sorted(set(table) - set(SECTION_NAMES))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; "
                          f"known: {', '.join(SECTION_NAMES)}")
    return table, source.parent, source


def parse_section(cls: type[Section], table: dict[str, Any], base: Path, where: str) -> Section:
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
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
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
