"""``gateway.v1.AuditService``: checkpoints, entries and proofs for auditors over gRPC.

Every RPC runs inside ``guard.call(context, rpc=..., action="audit.read")``, so identity,
policy and the audit record of the read itself are the guard's; this class only answers.
Proofs are for sizes the log has signed, so a client checks them against a signed checkpoint.
"""

from __future__ import annotations

import grpc

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.audit import AuditSink, parse_checkpoint
from gateway.errors import InvalidRequest, NotCheckpointed
from gateway.server._guard import Guard

#: Most entries one GetEntries call returns (the client pages with ``start``).
MAX_ENTRIES = 1000
_ACTION = "audit.read"


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Read access to the transparency log, gated by the policy action ``audit.read``."""

    def __init__(self, log: AuditSink, guard: Guard) -> None:
        self._log = log
        self._guard = guard

    def add_to_server(self, server: grpc.Server) -> None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(self, server)

    def _latest(self) -> tuple[str, int, bytes]:
        note = self._log.fresh_checkpoint()
        if note is None:
            raise NotCheckpointed("the audit log has not signed a checkpoint yet; retry shortly")
        cp = parse_checkpoint(note.split("\n\n", 1)[0] + "\n")
        return note, cp.size, cp.root

    def _note_for(self, size: int) -> tuple[str, int]:
        note, latest, _ = self._latest()
        if size == 0 or size == latest:
            return note, latest
        if size > latest:
            raise NotCheckpointed(f"no signed checkpoint of size {size} yet (latest {latest}); "
                                  "retry after the next checkpoint")
        found = self._log.checkpoint_note(size)
        if found is None:
            raise InvalidRequest(f"the log signed no checkpoint of size {size}")
        return found, size

    def GetCheckpoint(self, request: audit_pb2.GetCheckpointRequest,
                      context: grpc.ServicerContext) -> audit_pb2.Checkpoint:
        with self._guard.call(context, rpc="GetCheckpoint", action=_ACTION):
            note, size, root = self._latest()
            return audit_pb2.Checkpoint(signed_note=note.encode(), size=size, root_hash=root)

    def GetEntries(self, request: audit_pb2.GetEntriesRequest,
                   context: grpc.ServicerContext) -> audit_pb2.GetEntriesResponse:
        with self._guard.call(context, rpc="GetEntries", action=_ACTION):
            size = self._log.size
            start, end = request.start, request.end
            if start >= size or end <= start:
                raise InvalidRequest(f"entries [{start}, {end}) are not in the log of "
                                     f"{size} records")
            end = min(end, size, start + MAX_ENTRIES)
            return audit_pb2.GetEntriesResponse(entries=self._log.entries(start, end))

    def GetInclusionProof(self, request: audit_pb2.GetInclusionProofRequest,
                          context: grpc.ServicerContext) -> audit_pb2.InclusionProof:
        with self._guard.call(context, rpc="GetInclusionProof", action=_ACTION):
            note, size = self._note_for(request.tree_size)
            if request.index >= size:
                raise NotCheckpointed(f"record {request.index} is not covered by the signed "
                                      f"checkpoint of size {size} yet; retry shortly")
            # A ProofError is an AuditDataError: INVALID_ARGUMENT with its message.
            path = self._log.inclusion_proof(request.index, size)
            return audit_pb2.InclusionProof(index=request.index, tree_size=size, hashes=path,
                                            signed_note=note.encode())

    def GetConsistencyProof(self, request: audit_pb2.GetConsistencyProofRequest,
                            context: grpc.ServicerContext) -> audit_pb2.ConsistencyProof:
        with self._guard.call(context, rpc="GetConsistencyProof", action=_ACTION):
            first, second = request.first_size, request.second_size
            path = self._log.consistency_proof(first, second)
            return audit_pb2.ConsistencyProof(first_size=first, second_size=second,
                                              hashes=path)
