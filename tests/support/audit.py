"""A small closed audit log on disk, made through the real writer, for the audit verbs' tests
and the CLI's import bench."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.audit import AuditLog, AuditSettings, ensure_keys
from gateway.config import load_section


def small_log(root: Path, records: int, *, name: str = "test.local/audit",
              checkpoint_records: int = 8) -> tuple[Path, AuditSettings]:
    """``records`` decision records appended and the log closed, a checkpoint every
    ``checkpoint_records``; the config file (``[audit]`` only) and its settings."""
    config = root / "gw.toml"
    config.write_text(
        f'[audit]\ndirectory = "log"\nsigning_key = "keys/log.skey"\n'
        f'payload_key = "keys/payload.key"\nname = "{name}"\n'
        f"checkpoint_records = {checkpoint_records}\n")
    settings = load_section(config, "audit", AuditSettings)
    ensure_keys(settings)
    append_decisions(settings, records)
    return config, settings


def append_decisions(settings: AuditSettings, records: int, prefix: str = "r") -> None:
    """Open the log, append ``records`` allowed decisions (request ids ``<prefix>000`` on),
    close it."""
    with AuditLog.open(settings, instance_id="t") as audit:
        for i in range(records):
            audit.append("decision", {"request_id": f"{prefix}{i:03d}", "decision": "allow"})


def signed_sizes(settings: AuditSettings) -> list[int]:
    """The sizes the log's checkpoints sign, in order."""
    return sorted(int(json.loads(line).split("\n")[1]) for line in
                  (settings.directory / "checkpoints.jsonl").read_text().splitlines())
