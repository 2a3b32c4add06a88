"""Calling the gateway from Python: mTLS channels, audit receipts, and proving them.

Every answer the gateway gives (allowed or denied) carries an *audit receipt* in its gRPC
trailing metadata: the index of the audit record written for the call and that record's
Merkle leaf hash. ``tritonclient`` drops trailing metadata, so this module gives callers a
way to keep it:

    import tritonclient.grpc as tc
    from gateway.client import ReceiptInterceptor

    client = tc.InferenceServerClient(url="127.0.0.1:8443", ssl=True, ...)
    receipts = ReceiptInterceptor.attach(client)   # every later call records its receipt
    result = client.infer("demo-mlp", [x])
    receipt = receipts.last                        # Receipt(index=41, leaf_hash=b"...")

and a way to check one: :func:`prove_receipt` asks the AuditService (policy action
``audit.read``) for an inclusion proof of the receipt's record under the latest signed
checkpoint and verifies it against the log's verifier key, offline from the server's word.

This module imports no OIP (``inference``) protobuf code, so it can live in one process with
``tritonclient``, which defines the same protobuf package.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.audit.offline import Checkpoint

Request = TypeVar("Request")
Response = TypeVar("Response")

#: Trailing-metadata keys of the receipt (the server's ``gateway.server.RECEIPT_*``).
RECEIPT_INDEX = "gateway-audit-index"
RECEIPT_LEAF = "gateway-audit-leaf-hash"


@dataclass(frozen=True)
class ClientSettings:
    """``[client]``: how CLI commands that talk to a running gateway connect to it."""

    #: host:port of the gateway; empty: the ``[server] listen`` address of the same file.
    target: str = ""
    #: CA bundle the gateway's certificate must chain to; default: ``[tls] ca``.
    ca: Path | None = None
    #: Client certificate and key; default: the demo identity named by ``--as``.
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class Receipt:
    """Where the audit record of one call sits in the log."""

    index: int
    leaf_hash: bytes

    @classmethod
    def from_metadata(cls, metadata: Sequence[tuple[str, str | bytes]] | None
                      ) -> Receipt | None:
        """The receipt in a call's trailing metadata (None: the call carried none)."""
        found = {key: value for key, value in metadata or ()}
        index, leaf = found.get(RECEIPT_INDEX), found.get(RECEIPT_LEAF)
        if index is None or leaf is None:
            return None
        try:
            return cls(int(index), bytes.fromhex(str(leaf)))
        except ValueError:
            return None

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "leaf_hash": self.leaf_hash.hex()}


def channel(target: str, ca: Path, cert: Path, key: Path) -> grpc.Channel:
    """A mutual-TLS channel to the gateway; ConfigError naming a file that cannot be read."""
    material = []
    for what, path in (("CA bundle", ca), ("client certificate", cert), ("client key", key)):
        try:
            material.append(Path(path).read_bytes())
        except OSError as err:
            raise ConfigError(f"cannot read the {what} {path}: {err.strerror}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=material[0],
                                               private_key=material[2],
                                               certificate_chain=material[1])
    return grpc.secure_channel(target, credentials)


class ReceiptInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Records the audit receipt of every unary call made through the intercepted channel.

    ``last`` is the receipt of the calling thread's latest call (denied calls have one too);
    ``on_receipt`` (optional) hears every receipt with the method name.
    """

    def __init__(self, on_receipt: Callable[[str, Receipt], None] | None = None) -> None:
        self._local = threading.local()
        self._on_receipt = on_receipt

    @property
    def last(self) -> Receipt | None:
        return getattr(self._local, "receipt", None)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Request], grpc._CallFuture[Response]],
        client_call_details: grpc.ClientCallDetails,
        request: Request,
    ) -> grpc._CallFuture[Response]:
        outcome = continuation(client_call_details, request)
        receipt = Receipt.from_metadata(outcome.trailing_metadata())  # waits for the call
        self._local.receipt = receipt
        if receipt is not None and self._on_receipt is not None:
            self._on_receipt(client_call_details.method, receipt)
        return outcome

    @classmethod
    def attach(cls, client: _StubHolder, on_receipt: Callable[[str, Receipt], None] | None = None
               ) -> ReceiptInterceptor:
        """Intercept the calls of a ``tritonclient.grpc.InferenceServerClient``.

        tritonclient offers no interceptor hook, so this wraps its channel and rebuilds its
        stub (attributes ``_channel`` and ``_client_stub``, stable since tritonclient 2.0).
        """
        interceptor = cls(on_receipt)
        wrapped = grpc.intercept_channel(client._channel, interceptor)
        client._client_stub = type(client._client_stub)(wrapped)
        return interceptor


class _Stub(Protocol):
    def __init__(self, channel: grpc.Channel) -> None: ...


class _StubHolder(Protocol):
    """What :meth:`ReceiptInterceptor.attach` uses of a tritonclient InferenceServerClient."""

    _channel: grpc.Channel
    _client_stub: _Stub


def prove_receipt(audit_channel: grpc.Channel, receipt: Receipt, verifier_key: str,
                  *, timeout: float = 10.0) -> Checkpoint:
    """Prove that ``receipt``'s record is in the log, under a checkpoint signed by the key.

    ``audit_channel`` must present an identity allowed ``audit.read``; ``verifier_key`` is
    the log's note verifier key (``gateway audit vkey``). The record may be newer than the
    latest checkpoint (they are signed about once a second): this waits for one that covers
    it, up to ``timeout`` seconds. Returns the verified checkpoint; raises
    ``gateway.audit.offline.VerificationError`` if the proof does not verify.
    """
    import time

    from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
    from gateway.audit import offline

    stub = audit_pb2_grpc.AuditServiceStub(audit_channel)
    deadline = time.monotonic() + timeout
    while True:
        checkpoint = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest())
        if checkpoint.size > receipt.index or time.monotonic() >= deadline:
            break
        time.sleep(0.1)  # polling the server for the next signed checkpoint
    proof = stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(
        index=receipt.index, tree_size=checkpoint.size))
    text = offline.format_proof(proof.index, list(proof.hashes),
                                proof.signed_note.decode("utf-8"))
    _, verified = offline.verify_inclusion(text, offline.parse_verifier(verifier_key),
                                           leaf=receipt.leaf_hash)
    return verified
