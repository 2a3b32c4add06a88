"""The guard every RPC passes through: identity, then policy, then (after the work) audit.

    with guard.call(context, rpc="ModelInfer", action="infer", model=name, version=v) as call:
        model = call.model()             # the loaded model, or the reason it cannot serve
        ...                              # decode, run, encode
        return response                  # leaves only after the audit record is durable

On enter the caller's strings are checked against their length limits (INVALID_ARGUMENT),
the caller is authenticated (UNAUTHENTICATED), held to its concurrency limits
(RESOURCE_EXHAUSTED, see :mod:`gateway.server._limits`) and policy decides
(PERMISSION_DENIED); an unknown model is denied exactly like a forbidden one, so model names
cannot be probed. Refusals beyond a caller's refusal rate are answered RESOURCE_EXHAUSTED
and summarised rather than recorded one by one.
On exit one audit record is written and made durable before the response leaves; if that
fails the call fails with UNAVAILABLE instead of being served unaudited (fail closed). A
:class:`~gateway.errors.GatewayError` raised inside the block ends the call with its status;
anything else is logged and answered INTERNAL without a traceback.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal, NoReturn, TypeVar

import grpc

from gateway.audit import AuditSink
from gateway.config import ServerSettings
from gateway.errors import (
    AuditUnavailable,
    GatewayError,
    InvalidRequest,
    ModelUnavailable,
    PermissionDenied,
    PolicyUnavailable,
    QuotaExceeded,
    StateUnavailable,
    StreamEnded,
    Unauthenticated,
)
from gateway.identity import Identity, IdentityVerifier
from gateway.models import LOADED, LoadedModel, ModelEntry, ModelRepository
from gateway.monitor import Monitor
from gateway.policy import GATEWAY_OBJECT, Decision, PolicyStore
from gateway.server._limits import Limits, Stream

if TYPE_CHECKING:
    import numpy as np

    from gateway.monitor import InputProfile

log = logging.getLogger(__name__)

#: Trailing-metadata keys of the per-call audit receipt.
RECEIPT_INDEX = "gateway-audit-index"
RECEIPT_LEAF = "gateway-audit-leaf-hash"
#: Actions that consume the caller's quota (token bucket) in the monitor.
METERED_ACTIONS = frozenset({"infer", "explain"})
#: Length limits, in bytes of UTF-8, on the strings a caller chooses; checked before
#: anything else (INVALID_ARGUMENT beyond), so none of them is ever stored, logged or used
#: as a metric label at an arbitrary size.
MAX_MODEL_NAME = 255
MAX_MODEL_VERSION = 64
MAX_REQUEST_ID = 128
#: Tensor names, datatypes and parameter keys (ModelInfer) and any other caller string.
MAX_NAME = 255
#: Metric label for a model the repository does not know (names are caller-chosen).
UNKNOWN_MODEL = "(unknown)"
# Ids for calls that bring none: a random per-process prefix and a counter. Unique across
# restarts and replicas without a getrandom(2) per call, which releases the GIL and so costs
# a thread hand-off on a busy server; ids need uniqueness, not unpredictability.
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)
#: (caller, model) pairs whose merged attributes the guard keeps (then it starts afresh).
_MAX_ATTRIBUTE_PAIRS = 4096
Message = TypeVar("Message")


class Guard:
    """Identity, policy and audit for every handler, wired once at server start."""

    def __init__(self, *, verifier: IdentityVerifier, policy: PolicyStore,
                 models: ModelRepository, audit: AuditSink, monitor: Monitor,
                 limits: Limits | None = None) -> None:
        self.verifier = verifier
        self.policy = policy
        self.models = models
        self.audit = audit
        self.monitor = monitor
        self.limits = limits if limits is not None else Limits(ServerSettings())
        # (id(identity), id(model)) -> (identity, model, their merged attributes)
        self._attributes: dict[tuple[int, int], tuple[Identity, LoadedModel,
                                                      dict[str, object]]] = {}

    def call(self, context: grpc.ServicerContext, *, rpc: str, action: str | None,
             model: str = "", version: str = "", request_id: str = "",
             request_attributes: Mapping[str, object] | None = None,
             must_exist: bool = True, stream: str = "", summarise: bool = False,
             strings: Sequence[tuple[str, str]] = ()) -> Call:
        """A guarded call; ``action=None`` means a server-level RPC (certificate only).

        ``must_exist=False`` lets an allowed call name a model the repository does not know
        yet (loading a new version); otherwise unknown models are denied like forbidden ones.
        ``stream`` ("bidi" or "server") makes it a stream, held to the stream limits;
        ``summarise`` records only the caller's first such call per summary interval and
        counts the rest (health probes). ``strings`` are other caller-chosen strings, as
        (what, value) pairs, held to ``MAX_NAME`` bytes.
        """
        return Call(self, context, rpc, action, model, version, request_id,
                    request_attributes or {}, must_exist, stream, summarise, strings)

    def refuse(self, context: grpc.ServicerContext, rpc: str, error: GatewayError,
               reason: str) -> NoReturn:
        """Refuse a call before its handler runs (audited or, over the caller's refusal
        rate, counted); always ends by aborting the call."""
        call = Call(self, context, rpc, None, "", "", "", {}, True, "", False, ())
        try:
            call.identity = self.verifier.authenticate(context)
        except Unauthenticated:
            pass  # refused for ``error``; the record names the certificate, not an identity
        call._refuse(error, reason)

    def caller_and_model(self, identity: Identity, model: LoadedModel) -> dict[str, object]:
        """A fresh copy of the caller's and the model's ABAC attributes together.

        Both are fixed for as long as their objects live (the verifier keeps one Identity per
        certificate, the repository one LoadedModel per load), so the merge is done once per
        pair and copied per call instead of rebuilt from both.
        """
        key = (id(identity), id(model))
        cached = self._attributes.get(key)
        if cached is None or cached[0] is not identity or cached[1] is not model:
            merged = {**identity.attributes(), **model.attributes}
            if len(self._attributes) >= _MAX_ATTRIBUTE_PAIRS:
                self._attributes.clear()
            cached = self._attributes[key] = (identity, model, merged)
        return dict(cached[2])

    def write_summaries(self, *, everything: bool = False) -> None:
        """Append the ``call_summary`` records that are due (the health loop calls this)."""
        for record in self.limits.drain(everything=everything):
            try:
                self.audit.append("call_summary", record)
            except Exception:  # the log is unhealthy: health reports it; keep counting
                log.exception("call summary not recorded")


class Call:
    """One guarded RPC; see the module docstring."""

    __slots__ = ("_attributes", "_context", "_guard", "_holding", "_must_exist",
                 "_request_attributes", "_stream_kind", "_strings", "_summarise", "_t0",
                 "action", "decision", "entry", "fields", "identity", "model_name",
                 "request_id", "rpc", "stream", "timings", "trailers", "version")

    def __init__(self, guard: Guard, context: grpc.ServicerContext, rpc: str,
                 action: str | None, model: str, version: str, request_id: str,
                 request_attributes: Mapping[str, object], must_exist: bool,
                 stream: str, summarise: bool, strings: Sequence[tuple[str, str]]) -> None:
        self._guard = guard
        self._context = context
        self._t0 = time.perf_counter_ns()
        self.rpc = rpc
        self.action = action
        self.model_name = model
        self.version = version
        self.request_id = request_id or f"{_ID_PREFIX}-{next(_id_counter):08x}"
        self.identity: Identity | None = None
        self.decision: Decision | None = None
        self.entry: ModelEntry | None = None
        self.timings: dict[str, int] = {}
        #: Extra audit fields a handler adds (payload digest, cost, ...).
        self.fields: dict[str, object] = {}
        #: Extra trailing metadata a handler adds, sent after the receipt's (and with errors).
        self.trailers: list[tuple[str, str]] = []
        self._request_attributes = request_attributes
        self._must_exist = must_exist
        self._stream_kind = stream
        self._summarise = summarise
        self._strings = strings
        self._holding = False  # holds one of the identity's unary call slots
        #: The stream's slot (streams only), for :meth:`requests`.
        self.stream: Stream | None = None

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
        invalid = self._check_strings()
        try:
            identity = self.identity = guard.verifier.authenticate(self._context)
        except Unauthenticated as err:
            self._refuse(invalid or err, "invalid-argument" if invalid else "unauthenticated")
        if invalid is not None:
            self._refuse(invalid, "invalid-argument")
        limits = guard.limits
        if not self._stream_kind:
            if not limits.enter_call(identity.id):
                self._refuse(QuotaExceeded(
                    f"too many calls in progress for {identity.id} (at most "
                    f"{limits.settings.max_calls_per_identity} at once)"), "concurrency")
            self._holding = True
        if self.action is None:
            self._open_stream()
            self.timings["decision"] = _us_since(self._t0)
            if self._summarise and not limits.first_in_window(identity.id, self.rpc):
                return self  # counted on exit, not recorded one by one
            self._summarise = False
            guard.audit.announce()  # this call will append one record: let group commit wait
            return self
        monitor = guard.monitor
        if self.action in METERED_ACTIONS:
            try:
                monitor.admit(identity.id, guard.policy.snapshot.roles_of(identity.id))
            except QuotaExceeded as err:
                self._refuse(err, "quota")
            except StateUnavailable as err:  # shared quotas unreachable: fail closed, audited
                self._finish(err, "deny", "state-unavailable")
        if self.model_name:
            self.entry = guard.models.entry(self.model_name, self.version)
        self._attributes = self._base_attributes()
        decision = guard.policy.decide(identity.id, self.model_name, self.action,
                                       self._attributes)
        self.decision = decision
        self.timings["decision"] = _us_since(self._t0)
        if not decision.allowed:
            self._refuse(PermissionDenied(self.denied_message()), "policy")
        if self.model_name and self.entry is None and self._must_exist:
            self._refuse(PermissionDenied(self.denied_message()), "unknown-model")
        self._open_stream()
        guard.audit.announce()  # this call will append one record: let group commit wait
        return self

    def _check_strings(self) -> InvalidRequest | None:
        """The first caller-chosen string over its limit, as the error (None: all fit).

        An over-long string is replaced, in this call's record and metrics, by its first
        characters and its length, so it is never kept whole anywhere.
        """
        # Fast path: UTF-8 takes at most 4 bytes a character, so short strings fit unencoded.
        if len(self.model_name) <= MAX_MODEL_NAME // 4 and \
                len(self.version) <= MAX_MODEL_VERSION // 4 and \
                len(self.request_id) <= MAX_REQUEST_ID // 4 and \
                all(len(value) <= MAX_NAME // 4 for _, value in self._strings):
            return None
        checks = [("model name", self.model_name, MAX_MODEL_NAME),
                  ("model version", self.version, MAX_MODEL_VERSION),
                  ("request id", self.request_id, MAX_REQUEST_ID)]
        checks += [(what, value, MAX_NAME) for what, value in self._strings]
        for what, value, limit in checks:
            size = len(value.encode("utf-8", "replace"))
            if size > limit:
                self.model_name = _clip(self.model_name, MAX_MODEL_NAME)
                self.version = _clip(self.version, MAX_MODEL_VERSION)
                self.request_id = _clip(self.request_id, MAX_REQUEST_ID)
                return InvalidRequest(f"{what} is {size} bytes; at most {limit} are accepted")
        return None

    def _open_stream(self) -> None:
        if not self._stream_kind:
            return
        self.stream = self._guard.limits.open_stream(self._caller().id, self._context,
                                                     idle=self._stream_kind == "bidi")
        if self.stream is None:
            settings = self._guard.limits.settings
            self._refuse(QuotaExceeded(
                f"too many streams open (at most {settings.max_streams_per_identity} per "
                f"identity and {settings.max_streams} in all)"), "concurrency")

    def requests(self, iterator: Iterable[Message]) -> Iterator[Message]:
        """The caller's stream of messages; each one resets the stream's idle time.

        When the stream ends early (cut by its idle or total limit, or cancelled by the
        caller) this raises :class:`StreamEnded`, so the call's record says why.
        """
        stream = self.stream
        assert stream is not None, "requests() is for calls opened with stream="
        try:
            for message in iterator:
                stream.touch()
                yield message
        except grpc.RpcError:
            if stream.ended is None:
                raise StreamEnded("stream cancelled by the caller") from None
        if stream.ended is not None:  # cut by the watchdog, however gRPC reported it
            limits = self._guard.limits.settings
            raise StreamEnded(
                f"stream idle for {limits.stream_idle_seconds:g} s; ended"
                if stream.ended == "idle" else
                f"stream open for {limits.stream_max_seconds:g} s; ended")

    def _refuse(self, error: GatewayError, reason: str) -> NoReturn:
        """Refuse the call: recorded, or beyond the caller's refusal rate only counted."""
        guard = self._guard
        identity = self.identity
        cert = identity.cert_sha256 if identity is not None else \
            guard.verifier.presented_sha256(self._context)
        key = identity.id if identity is not None else (cert or "")
        if guard.limits.refusal_allowed(key, self._context):
            self._finish(error, "deny", reason)
        self._release()
        guard.limits.count(None if identity is None else identity.id, cert, self.rpc, reason,
                           grpc.StatusCode.RESOURCE_EXHAUSTED.name)
        guard.monitor.metrics.refusal_limited(reason)
        self._abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{error} (refused calls from this caller are over their rate limit; "
                    f"they are counted, not recorded one by one)")

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._guard.limits.exit_call(self._caller().id)

    def authorize_with(self, attributes: Mapping[str, object]) -> None:
        """Ask policy again with attributes known only after decoding (anomaly scores).

        The first decision, before any tensor was decoded, stands for everything else; this
        one can only turn an allow into a deny (PERMISSION_DENIED, audited as ``anomaly``).
        """
        assert self.action is not None, "server-level calls have nothing more to decide"
        self._attributes.update(attributes)
        decision = self._guard.policy.decide(self._caller().id, self.model_name, self.action,
                                             self._attributes)
        self.decision = decision
        if not decision.allowed:
            raise PermissionDenied(self.denied_message(), reason="anomaly")

    def authorize_on_scores(self, model: LoadedModel, profile: InputProfile | None,
                            rows: np.ndarray) -> bool:
        """When policy decides on ``anomaly.*`` attributes: score ``rows`` (every row the
        caller chose: ModelInfer's batch, Explain's input and baseline) now and ask policy
        again with the scores (:meth:`authorize_with`).

        Returns whether the rows were scored here, so monitoring does not score them twice.
        Every RPC that runs a model on caller data goes through this one check, so an
        ``anomaly.*`` rule holds whichever RPC carries the data.
        """
        guard = self._guard
        if not guard.policy.references("anomaly."):
            return False
        self.authorize_with(guard.monitor.score(monitor_key(model), profile,
                                                self._caller().id, rows))
        return True

    def denied_message(self) -> str:
        # One message for "forbidden" and "no such model": callers cannot tell them apart.
        # Server-level actions are decided on the object @gateway: name it, so the operator
        # knows which rule to write (e.g. ListModels needs metadata on @gateway).
        target = f" on model '{self.model_name}'" if self.model_name else f" on {GATEWAY_OBJECT}"
        return f"permission denied: {self.action}{target}"

    def _base_attributes(self) -> dict[str, object]:
        identity = self._caller()
        entry = self.entry
        model = entry.model if entry is not None else None
        if model is not None:
            attributes = self._guard.caller_and_model(identity, model)
        else:
            attributes = dict(identity.attributes())
            if self.model_name:
                attributes["model.name"] = self.model_name
                attributes["model.version"] = self.version
        now = int(time.time())
        attributes["request.time"] = now
        attributes["request.hour"] = now // 3600 % 24  # UTC, as gmtime: POSIX days are 86400 s
        attributes.update(self._request_attributes)
        return attributes

    def _caller(self) -> Identity:
        """The authenticated caller: set on enter before anything that needs it runs."""
        assert self.identity is not None, "the call was not admitted"
        return self.identity

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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is None and self._summarise:
            self._summarised()
            return False
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
        self._release()
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
            *self.trailers,
        ))
        self._observe(decision, status)
        if error is not None:
            self._abort(status, str(error))

    def _summarised(self) -> None:
        """A call only counted into its summary (health probes after the interval's first)."""
        self.timings["total"] = _us_since(self._t0)
        self._release()
        identity = self._caller()
        self._guard.limits.count(identity.id, identity.cert_sha256, self.rpc, "summarised",
                                 grpc.StatusCode.OK.name)
        self._observe("allow", grpc.StatusCode.OK)

    def _observe(self, decision: str, status: grpc.StatusCode) -> None:
        """Request metrics, labelled only with models the repository knows."""
        monitor = self._guard.monitor
        entry = self.entry
        if entry is None and self.model_name:  # refused before the model was looked up
            entry = self._guard.models.entry(self.model_name, self.version)
        if entry is not None:
            model, version = entry.name, entry.version
        else:
            model, version = (UNKNOWN_MODEL if self.model_name else ""), ""
        monitor.observe_request(model, version, self.action or "server", decision,
                                status.name, {k: v / 1e6 for k, v in self.timings.items()})

    def _abort(self, status: grpc.StatusCode, message: str) -> NoReturn:
        try:
            self._context.abort(status, message)
        except Exception as aborted:  # grpc signals abort by raising; keep it recognisable
            raise _Finished() from aborted

    def _refused_caller(self) -> dict[str, str | None] | None:
        """A caller without an identity: the SHA-256 of the certificate it presented, if any,
        so a refused certificate can still be named (None: it presented none)."""
        cert = self._guard.verifier.presented_sha256(self._context)
        return None if cert is None else {"id": None, "cert_sha256": cert, "issuer": None,
                                          "serial": None}

    def _record(self, decision: str, reason: str, status: grpc.StatusCode) -> dict[str, object]:
        identity = self.identity
        entry = self.entry
        model = entry.model if entry is not None else None
        policy = self.decision
        record: dict[str, object] = {
            "caller": self._refused_caller() if identity is None else {
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


def monitor_key(model: LoadedModel) -> str:
    """The monitor's key for a model version; `gateway monitor` joins metrics on it."""
    return f"{model.name}/{model.version}"


class _Finished(Exception):
    """Raised through the handler after the call was audited and aborted."""


def _clip(value: str, limit: int) -> str:
    size = len(value.encode("utf-8", "replace"))
    return value if size <= limit else f"{value[:32]}...({size} bytes)"


def _us_since(t0: int) -> int:
    return (time.perf_counter_ns() - t0) // 1000
