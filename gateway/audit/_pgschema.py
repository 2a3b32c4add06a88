"""The PostgreSQL audit log's tables, shared by the writer (``_pglog``) and the reader
(``_pgread``): one log per schema, whatever number of replicas and processes write to it.

``gateway_audit_log``
    One row, the head: the log's origin and verifier key (a replica configured with another
    key is refused), its size and the hex leaf hash of its last record. Sequencing holds this
    row's lock for the short transaction that assigns a batch its indices and inserts it.
``gateway_audit_record (seq, data)``
    Every record, its canonical bytes exactly as a file log's segment line holds them (the
    Merkle leaf). Leaf hashes are not stored: every reader recomputes and chain-checks them.
``gateway_audit_checkpoint (size, note, epoch, signer, signed_at)``
    Every signed checkpoint (C2SP note, byte for byte), with the lease epoch of the integrator
    that stored it.
``gateway_audit_lease``
    One row: which process is the integrator (the only signer) and until when; ``epoch`` grows
    with every change of holder and fences the checkpoints stored (see ``_pglog``).
``gateway_audit_writer (instance, commits, seen)``
    One row per writing process: the durability barrier of its commits writes here.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_audit_log (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    origin TEXT NOT NULL,
    vkey TEXT NOT NULL,
    size BIGINT NOT NULL CHECK (size >= 0),
    prev TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_audit_record (
    seq BIGINT PRIMARY KEY CHECK (seq >= 0),
    data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_audit_checkpoint (
    size BIGINT PRIMARY KEY CHECK (size >= 0),
    note TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    signer TEXT NOT NULL,
    signed_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS gateway_audit_lease (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    holder TEXT NOT NULL DEFAULT '',
    epoch BIGINT NOT NULL DEFAULT 0,
    expires TIMESTAMPTZ NOT NULL DEFAULT '-infinity');
INSERT INTO gateway_audit_lease DEFAULT VALUES ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS gateway_audit_writer (
    instance TEXT PRIMARY KEY,
    commits BIGINT NOT NULL DEFAULT 0,
    seen TIMESTAMPTZ NOT NULL DEFAULT now());
"""

#: Serialises schema creation by replicas starting at once (CREATE ... IF NOT EXISTS races).
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('gateway_audit_schema'))"

#: Records read per query when a reader catches up with the log.
CHUNK = 20_000
