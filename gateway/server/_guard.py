"""The guard every RPC passes through: identity, then policy, then (after the work) audit.

    with guard.call(context, rpc="ModelInfer", action="infer", model=name, version=v) as call:
        model = call.model()             # the loaded model, or the reason it cannot serve
        ...                              # decode, run, encode
        return response                  # leaves only after the audit record is durable

On enter the caller is authenticated (UNAUTHENTICATED) and policy decides (PERMISSION_DENIED);
an unknown model is denied exactly like a forbidden one, so model names cannot be probed.
On exit one audit record is written and made durable before the response leaves; if that
fails the call fails with UNAVAILABLE instead of being served unaudited (fail closed). A
:class:`~gateway.errors.GatewayError` raised inside the block ends the call with its status;
anything else is logged and answered INTERNAL without a traceback.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Mapping

import grpc

from gateway.errors import (
    AuditUnavailable,
    GatewayError,
    ModelUnavailable,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
)
from gateway.models import LOADED, LoadedModel, ModelEntry
from gateway.policy import GATEWAY_OBJECT

log = logging.getLogger(__name__)

#: Trailing-metadata keys of the per-call audit receipt.
RECEIPT_INDEX = "gateway-audit-index"
RECEIPT_LEAF = "gateway-audit-leaf-hash"
#: Actions that consume the caller's quota (token bucket) in the monitor.
METERED_ACTIONS = frozenset({"infer", "explain"})
#: Longest request id accepted from a caller; longer ones are replaced, not truncated silently.
_MAX_REQUEST_ID = 128
# Ids for calls that bring none: a random per-process prefix and a counter. Unique across
# restarts and replicas without a getrandom(2) per call, which releases the GIL and so costs
# a thread hand-off on a busy server; ids need uniqueness, not unpredictability.
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)


class Guard:
    """Identity, policy and audit for every handler, wired once at server start."""

    def __init__(self, *, verifier, policy, models, audit, monitor=None) -> None:
        self.verifier = verifier
        self.policy = policy
        self.models = models
        self.audit = audit
        self.monitor = monitor

    def call(self, context: grpc.ServicerContext, *, rpc: str, action: str | None,
             model: str = "", version: str = "", request_id: str = "",
             request_attributes: Mapping[str, object] | None = None,
             must_exist: bool = True) -> Call:
        """A guarded call; ``action=None`` means a server-level RPC (certificate only).

        ``must_exist=False`` lets an allowed call name a model the repository does not know
        yet (loading a new version); otherwise unknown models are denied like forbidden ones.
        """
        return Call(self, context, rpc, action, model, version, request_id,
                    request_attributes or {}, must_exist)


class Call:
    """One guarded RPC; see the module docstring."""

    __slots__ = ("_attributes", "_context", "_guard", "_must_exist", "_request_attributes",
                 "_t0", "action", "decision", "entry", "fields", "identity", "model_name",
                 "request_id", "rpc", "timings", "version")

    def __init__(self, guard: Guard, context: grpc.ServicerContext, rpc: str,
                 action: str | None, model: str, version: str, request_id: str,
                 request_attributes: Mapping[str, object], must_exist: bool) -> None:
        self._guard = guard
        self._context = context
        self._t0 = time.perf_counter_ns()
        self.rpc = rpc
        self.action = action
        self.model_name = model
        self.version = version
        self.request_id = (request_id if request_id and len(request_id) <= _MAX_REQUEST_ID
                           else f"{_ID_PREFIX}-{next(_id_counter):08x}")
        self.identity = None
        self.decision = None
        self.entry: ModelEntry | None = None
        self.timings: dict[str, int] = {}
        #: Extra audit fields a handler adds (payload digest, cost, ...).
        self.fields: dict[str, object] = {}
        self._request_attributes = request_attributes
        self._must_exist = must_exist
        guard.audit.announce()  # this call will append one record: let group commit wait

    # -- enter: identity, then policy ------------------------------------------------------

    def __enter__(self) -> Call:
        try:
            return self._admit()
        except _Finished:
            raise
        except Exception:
            # Fail closed: a caller that cannot be authenticated or a policy that cannot be
            # evaluated refuses the call (audited), it never lets it through.
            log.exception("cannot decide %s", self.rpc)
            self._finish(PolicyUnavailable("the call could not be authorized; it was refused"),
                         "deny", "policy-error")
            raise  # unreachable: _finish aborts

    def _admit(self) -> Call:
        guard = self._guard
        try:
            self.identity = guard.verifier.authenticate(self._context)
        except Unauthenticated as err:
            self.fields["caller"] = presented_certificate(self._context)
            self._finish(err, "deny", "unauthenticated")
        if self.action is None:
            self.timings["decision"] = _us_since(self._t0)
            return self
        monitor = guard.monitor
        if monitor is not None and self.action in METERED_ACTIONS:
            try:
                monitor.admit(self.identity.id, guard.policy.snapshot.roles_of(self.identity.id))
            except QuotaExceeded as err:
                self._finish(err, "deny", "quota")
        if self.model_name:
            self.entry = guard.models.entry(self.model_name, self.version)
        self._attributes = self._base_attributes()
        decision = guard.policy.decide(self.identity.id, self.model_name, self.action,
                                       self._attributes)
        self.decision = decision
        self.timings["decision"] = _us_since(self._t0)
        if not decision.allowed:
            self._finish(PermissionDenied(self.denied_message()), "deny", "policy")
        if self.model_name and self.entry is None and self._must_exist:
            self._finish(PermissionDenied(self.denied_message()), "deny", "unknown-model")
        return self

    def authorize_with(self, attributes: Mapping[str, object]) -> None:
        """Ask policy again with attributes known only after decoding (anomaly scores).

        The first decision, before any tensor was decoded, stands for everything else; this
        one can only turn an allow into a deny (PERMISSION_DENIED, audited as ``anomaly``).
        """
        self._attributes.update(attributes)
        decision = self._guard.policy.decide(self.identity.id, self.model_name, self.action,
                                             self._attributes)
        self.decision = decision
        if not decision.allowed:
            raise PermissionDenied(self.denied_message(), reason="anomaly")

    def denied_message(self) -> str:
        # One message for "forbidden" and "no such model": callers cannot tell them apart.
        # Server-level actions are decided on the object @gateway: name it, so the operator
        # knows which rule to write (e.g. ListModels needs metadata on @gateway).
        target = f" on model '{self.model_name}'" if self.model_name else f" on {GATEWAY_OBJECT}"
        return f"permission denied: {self.action}{target}"

    def _base_attributes(self) -> dict[str, object]:
        attributes = dict(self.identity.attributes())
        entry = self.entry
        if entry is not None and entry.model is not None:
            attributes.update(entry.model.attributes)
        elif self.model_name:
            attributes["model.name"] = self.model_name
            attributes["model.version"] = self.version
        now = time.time()
        attributes["request.time"] = int(now)
        attributes["request.hour"] = time.gmtime(now).tm_hour
        attributes.update(self._request_attributes)
        return attributes

    # -- the handler's view -----------------------------------------------------------------

    def model(self) -> LoadedModel:
        """The model the call is for; FAILED_PRECONDITION naming why if it cannot serve."""
        entry = self.entry
        if entry is None or entry.state != LOADED or entry.model is None:
            reason = entry.reason if entry is not None else "not loaded"
            raise ModelUnavailable(f"model '{self.model_name}' version "
                                   f"{entry.version if entry else self.version or '(latest)'} "
                                   f"is not being served: {reason}")
        return entry.model

    # -- exit: audit, then the response ----------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self._finish(None, "allow", "policy" if self.action else "certificate")
            return False
        if isinstance(exc, _Finished):
            return False  # already audited and aborted on enter
        if isinstance(exc, PermissionDenied):
            self._finish(exc, "deny", exc.reason)
        elif isinstance(exc, QuotaExceeded):
            self._finish(exc, "deny", "quota")
        elif isinstance(exc, GatewayError):
            self._finish(exc, "allow", "policy" if self.action else "certificate")
        else:
            log.exception("internal error in %s", self.rpc)
            self._finish(GatewayError("internal error; the gateway logged the details"),
                         "allow", "policy")
        return False

    def _finish(self, error: GatewayError | None, decision: str, reason: str) -> None:
        """Write the audit record; then abort with ``error`` or let the response leave."""
        status = grpc.StatusCode.OK if error is None else error.status
        self.timings["total"] = _us_since(self._t0)
        record = self._record(decision, reason, status)
        try:
            receipt = self._guard.audit.append("decision", record)
        except AuditUnavailable as err:
            log.error("audit record for %s not durable: %s", self.rpc, err)
            self._abort(grpc.StatusCode.UNAVAILABLE,
                        "the audit log cannot record this call; it was not served")
        except Exception:
            log.exception("audit append failed for %s", self.rpc)
            self._abort(grpc.StatusCode.UNAVAILABLE,
                        "the audit log cannot record this call; it was not served")
        self._context.set_trailing_metadata((
            (RECEIPT_INDEX, str(receipt.index)),
            (RECEIPT_LEAF, receipt.leaf_hash.hex()),
        ))
        monitor = self._guard.monitor
        if monitor is not None:
            monitor.observe_request(self.model_name, self.version, self.action or "server",
                                    decision, status.name,
                                    {k: v / 1e6 for k, v in self.timings.items()})
        if error is not None:
            self._abort(status, str(error))

    def _abort(self, status: grpc.StatusCode, message: str) -> None:
        try:
            self._context.abort(status, message)
        except Exception as aborted:  # grpc signals abort by raising; keep it recognisable
            raise _Finished() from aborted

    def _record(self, decision: str, reason: str, status: grpc.StatusCode) -> dict:
        identity = self.identity
        entry = self.entry
        model = entry.model if entry is not None else None
        policy = self.decision
        record = {
            "caller": None if identity is None else {
                "id": identity.id, "cert_sha256": identity.cert_sha256,
                "issuer": identity.issuer, "serial": identity.serial,
            },
            "rpc": self.rpc,
            "action": self.action,
            "model": None if not self.model_name else {
                "name": self.model_name,
                "version": entry.version if entry is not None else self.version,
                "digest": model.digest if model is not None else None,
            },
            "decision": decision,
            "reason": reason,
            "policy": None if policy is None else {
                "digest": policy.policy_digest, "rule": policy.rule,
            },
            "request_id": self.request_id,
            "status": status.name,
            "latency_us": dict(self.timings),
        }
        record.update(self.fields)
        return record


class PolicyUnavailable(GatewayError):
    """Authorization itself failed (not a denial): the call is refused, fail closed."""

    status = grpc.StatusCode.UNAVAILABLE


class _Finished(Exception):
    """Raised through the handler after the call was audited and aborted."""


def presented_certificate(context: grpc.ServicerContext) -> dict | None:
    """The audit ``caller`` of a refused caller: the SHA-256 (over DER, as for any caller) of
    the certificate it presented, no identity. None if it presented none."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    try:
        der = ssl.PEM_cert_to_DER_cert(pems[0].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        der = pems[0]  # not PEM after all: the hash of what was presented still identifies it
    return {"id": None, "cert_sha256": hashlib.sha256(der).hexdigest(), "issuer": None,
            "serial": None}


def _us_since(t0: int) -> int:
    return (time.perf_counter_ns() - t0) // 1000
