"""One error hierarchy for the whole gateway.

Every error a person may see derives from :class:`GatewayError`. Its message says what is
wrong in terms a security engineer can act on; :meth:`GatewayError.diagnostics` adds the
longer explanation the CLI prints, and ``status`` is the gRPC status a request failing with
this error gets. Statuses are set here and only here: a package's own errors derive from one
of these classes (or from its package's base below) and inherit their status, so the guard
maps every error to a status without a table of its own and no boundary re-wraps one error
into another only to change its status.

Importing this module loads no gRPC (the standalone audit verifier uses these classes on
machines without it): a status is resolved from its name on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class _Status:
    """A class attribute that reads as the ``grpc.StatusCode`` it names (imported on use)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.name]


class GatewayError(Exception):
    """Base of every gateway error; ``str(err)`` is safe to show to the caller."""

    status = _Status("INTERNAL")

    def diagnostics(self) -> str:
        """A longer, human explanation for the CLI (defaults to the message)."""
        return str(self)


class ConfigError(GatewayError):
    """The configuration file is missing, malformed or inconsistent."""

    status = _Status("FAILED_PRECONDITION")


class Unauthenticated(GatewayError):
    """The caller presented no acceptable identity."""

    status = _Status("UNAUTHENTICATED")


class PermissionDenied(GatewayError):
    """Policy denied the action (also used for unknown models, so names cannot be probed).

    ``reason`` is the audit reason code (``policy``, ``unknown-model``, ``anomaly``); it is
    recorded, never sent to the caller, who sees the same message whatever the reason.
    """

    status = _Status("PERMISSION_DENIED")

    def __init__(self, message: str, reason: str = "policy") -> None:
        super().__init__(message)
        self.reason = reason


class InvalidRequest(GatewayError):
    """The request is malformed: wrong datatype, shape, size, or mixed encodings."""

    status = _Status("INVALID_ARGUMENT")


class ModelUnavailable(GatewayError):
    """The model exists but may not be served (refused at load, unsigned, tampered).

    Every signing, trust, scan and load error derives from this class. ``str(err)`` is the
    reason a caller may see: no server paths, no ONNX Runtime internals. ``detail`` is the
    full story (paths, library messages) for the server log, the audit record and the CLI.
    """

    status = _Status("FAILED_PRECONDITION")

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message

    def diagnostics(self) -> str:
        return self.detail


class QuotaExceeded(GatewayError):
    """The caller exceeded a quota or budget."""

    status = _Status("RESOURCE_EXHAUSTED")


class AuditUnavailable(GatewayError):
    """The audit record could not be made durable; the call must not be served."""

    status = _Status("UNAVAILABLE")


# The classes here share one shape (a docstring and a status) on purpose: each is a distinct
# status or audit reason a caller or the guard tells apart, so they are not folded into one.


class PolicyUnavailable(GatewayError):
    """Authorization itself failed (not a denial): the call is refused, fail closed."""

    status = _Status("UNAVAILABLE")


class StateUnavailable(GatewayError):
    """Shared state (the host's hub or the database) cannot answer: a quota or budget that
    cannot be checked refuses the call, fail closed, never a silent allow."""

    status = _Status("UNAVAILABLE")


class StreamEnded(GatewayError):
    """A stream ended before its caller closed it: a time limit, or the caller cancelled."""

    status = _Status("CANCELLED")


class ResponseTooLarge(GatewayError):
    """The response is larger than the server may send."""

    status = _Status("RESOURCE_EXHAUSTED")


class NotCheckpointed(GatewayError):
    """The request needs a signed checkpoint the audit log has not published (yet)."""

    status = _Status("FAILED_PRECONDITION")


# -- one base per domain package -----------------------------------------------------------


class AuditDataError(GatewayError):
    """Audit data (a record, segment, note, key or proof) is malformed or does not verify.

    Raised by the audit package's parsers and verifiers; a request that asks the log for a
    proof it cannot give (``AuditService``) gets INVALID_ARGUMENT with the message.
    """

    status = _Status("INVALID_ARGUMENT")


class IdentityError(GatewayError):
    """An identity string (a SPIFFE ID or trust domain) is malformed."""

    status = _Status("INVALID_ARGUMENT")
