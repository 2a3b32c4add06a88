"""Tamper-evident audit log: canonical records, hash chain, RFC 6962 Merkle tree, C2SP checkpoints.

    from gateway.audit import AuditLog, AuditSettings
    log = AuditLog.open(AuditSettings(), instance_id="gw-1")
    receipt = log.append("decision", {"rpc": "ModelInfer", "decision": "allow", ...})
    log.close()

``append`` returns once the record is durable (group commit: concurrent calls share one
fdatasync) and covered by a commit tag only the gateway can make (``_tags.py``). Checkpoints
are signed every ``checkpoint_records`` records, at most ``checkpoint_ms`` milliseconds after
a record became durable (idle or not), and at close; each is copied to a witness file outside
the log directory, so a rolled-back log is refused at open. Auditors check the log offline
with ``gateway audit verify`` and single records with inclusion proofs; see
``gateway/audit/README.md`` for the record schema and formats. The API defined here is what
the server and the CLI use (the serving layer's ``AuditService`` answers auditors with
``AuditLog`` and ``parse_checkpoint``); everything else is private. Importing it loads no
gRPC, so the standalone verifier (:mod:`gateway.audit.offline`) can import it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.audit._log import AuditLog, AuditLogDamaged, Receipt
from gateway.audit._merkle import ProofError
from gateway.audit._note import parse_checkpoint
from gateway.audit._sink import AuditSink

if TYPE_CHECKING:
    from gateway.audit._pgread import PgLogReader

__all__ = ["RECORD_SCHEMA", "AuditLog", "AuditLogDamaged", "AuditSettings", "AuditSink",
           "PgLogReader", "ProofError", "Receipt", "ensure_keys", "export_log",
           "generate_keys", "open_log", "parse_checkpoint", "pg_log_reader", "signer_vkey",
           "verifier_key_path"]

#: The JSON Schema every record the gateway writes satisfies (tests check each kind).
RECORD_SCHEMA = Path(__file__).with_name("record.schema.json")


@dataclass(frozen=True)
class AuditSettings:
    """Where the audit log and its keys live, how it commits, signs and rotates."""

    #: Log directory: ``segments/``, ``checkpoint`` and ``checkpoints.jsonl``.
    directory: Path = Path("var/audit/log")
    #: Ed25519 checkpoint signing key (note ``PRIVATE+KEY+...`` format, mode 0600). The verifier
    #: key is written beside it with the suffix ``.vkey``.
    signing_key: Path = Path("var/audit/keys/log.skey")
    #: HMAC-SHA256 key for request payload digests (base64, mode 0600).
    payload_key: Path = Path("var/audit/keys/payload.key")
    #: Log name: the checkpoint origin and the signing key's name (used by keygen).
    name: str = "gateway.local/audit"
    #: Publish a signed checkpoint after this many new records ...
    checkpoint_records: int = 4096
    #: ... or this many milliseconds after the first unsigned record, whichever comes first.
    checkpoint_ms: int = 1000
    #: Start a new segment when the current one would exceed this many bytes.
    segment_bytes: int = 64 * 1024 * 1024
    #: Also start a new segment after this many seconds (0: by size only).
    segment_seconds: int = 0
    #: Group commit under load: a commit waits up to this long (µs) for the records of calls
    #: already in flight, so one write and one flush carry them all (0: commit at once).
    #: An idle log never waits: a lone call commits its own record immediately.
    group_commit_window_us: int = 1000
    #: Preallocate segments (posix_fallocate) so commits do not grow the file (faster commits).
    preallocate: bool = True
    #: Witness copy of the latest signed checkpoint, byte for byte as ``<directory>/checkpoint``,
    #: kept outside the log directory (another path or volume): the gateway refuses to open a
    #: log older than it (a rolled-back or replaced directory). Default (None):
    #: ``witness/checkpoint`` beside the keys directory, i.e. ``var/audit/witness/checkpoint``.
    witness: Path | None = None
    #: Where the records live: "file" (``directory``, one process or one hub) or "postgresql"
    #: (``dsn``: one log shared by every replica and worker; see "Running several replicas"
    #: in the README). ``directory`` and the segment settings are then unused; the keys and
    #: the witness copy stay files on each replica.
    backend: str = "file"
    #: PostgreSQL DSN for backend "postgresql"; empty: the environment variable GATEWAY_DSN.
    dsn: str = ""
    #: Backend "postgresql": how long the integrator's lease (the right to sign checkpoints)
    #: lasts without renewal: a dead integrator is replaced about this long after it died.
    lease_ms: int = 3000

    def __post_init__(self) -> None:
        if self.backend not in ("file", "postgresql"):
            from gateway.errors import ConfigError
            raise ConfigError(f"[audit] backend must be \"file\" or \"postgresql\", "
                              f"not {self.backend!r}")
        if self.lease_ms < 100 or self.checkpoint_ms <= 0:
            from gateway.errors import ConfigError
            raise ConfigError("[audit] lease_ms must be at least 100 and checkpoint_ms "
                              "positive")

    def witness_path(self) -> Path:
        """Where the witness copy is kept (``witness``, or its default beside the keys)."""
        if self.witness is not None:
            return self.witness
        return self.signing_key.parent.parent / "witness" / "checkpoint"


def open_log(settings: AuditSettings, *, instance_id: str) -> AuditSink:
    """Open the log ``settings.backend`` names: the file log, or the PostgreSQL log shared by
    every replica (imported only then, so a file-log gateway never loads the driver)."""
    if settings.backend == "postgresql":
        from gateway.audit._pglog import PgAuditLog

        return PgAuditLog.open(settings, instance_id=instance_id)
    return AuditLog.open(settings, instance_id=instance_id)


def ensure_keys(settings: AuditSettings) -> None:
    """Create the log signing key and the payload and commit tag HMAC keys where ``settings``
    say, if absent."""
    from gateway.audit import _keys

    if not settings.signing_key.exists() or not settings.payload_key.exists():
        if settings.signing_key.exists() or settings.payload_key.exists():
            # One key without the other: keep the one that exists (it may sign a live log).
            from gateway.errors import ConfigError
            raise ConfigError(f"only one of {settings.signing_key} and {settings.payload_key} "
                              "exists; restore the other or run `gateway audit keygen --force`")
        _keys.generate(settings.signing_key, settings.payload_key, settings.name)
    _keys.ensure_commit_key(settings.signing_key)


def generate_keys(settings: AuditSettings, name: str | None = None, *,
                  force: bool = False) -> str:
    """Write new log keys where ``settings`` say (refusing to overwrite unless ``force``);
    return the verifier key ``name+keyid+base64`` for auditors."""
    from gateway.audit import _keys

    return _keys.generate(settings.signing_key, settings.payload_key, name or settings.name,
                          force=force).vkey


def verifier_key_path(settings: AuditSettings) -> Path:
    """Where the verifier key is written, beside the signing key."""
    return settings.signing_key.with_suffix(".vkey")


def signer_vkey(settings: AuditSettings) -> str:
    """The verifier key: read beside the signing key, or derived from the signing key."""
    path = verifier_key_path(settings)
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    from gateway.audit import _keys

    return _keys.load_signer(settings.signing_key).vkey


def export_log(settings: AuditSettings, dest: Path) -> int:
    """Back the log up to ``dest`` up to its latest signed checkpoint; return that size.

    A PostgreSQL log is exported as a log directory exactly like a file log's, so auditors
    verify both the same way (``gateway audit verify DIR``, :mod:`gateway.audit.offline`)."""
    if settings.backend == "postgresql":
        from gateway.audit._pgread import PgLogReader

        with PgLogReader(settings.dsn) as reader:
            return reader.export(dest, verifier_key_path(settings))
    from gateway.audit._export import export_log as export

    return export(settings.directory, dest, verifier_key_path(settings))


def __getattr__(name: str) -> object:
    # PgLogReader is imported on first use, so a file-log gateway never loads the driver.
    if name == "PgLogReader":
        from gateway.audit._pgread import PgLogReader

        return PgLogReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pg_log_reader(dsn: str = "") -> PgLogReader:
    """A read-only view of the PostgreSQL log at ``dsn`` (else $GATEWAY_DSN) for the CLI:
    checkpoints, entries, proofs, verification and export (close it, or use ``with``)."""
    from gateway.audit._pgread import PgLogReader

    return PgLogReader(dsn)
