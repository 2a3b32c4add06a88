"""One error hierarchy for the whole gateway.

Every error a person may see derives from :class:`GatewayError`. Its message says what is
wrong in terms a security engineer can act on; :meth:`GatewayError.diagnostics` adds the
longer explanation the CLI prints, and ``status`` is the gRPC status a request failing with
this error gets, so the servicer maps errors to statuses in one place.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """Base of every gateway error; ``str(err)`` is safe to show to the caller."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def diagnostics(self) -> str:
        """A longer, human explanation for the CLI (defaults to the message)."""
        return str(self)


class ConfigError(GatewayError):
    """The configuration file is missing, malformed or inconsistent."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(GatewayError):
    """The caller presented no acceptable identity."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    """Policy denied the action (also used for unknown models, so names cannot be probed).

    ``reason`` is the audit reason code (``policy``, ``unknown-model``, ``anomaly``); it is
    recorded, never sent to the caller, who sees the same message whatever the reason.
    """

    status = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, reason: str = "policy") -> None:
        super().__init__(message)
        self.reason = reason


class InvalidRequest(GatewayError):
    """The request is malformed: wrong datatype, shape, size, or mixed encodings."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class ModelUnavailable(GatewayError):
    """The model exists but may not be served (refused at load, unsigned, tampered).

    Every signing, trust, scan and load error derives from this class. ``str(err)`` is the
    reason a caller may see: no server paths, no ONNX Runtime internals. ``detail`` is the
    full story (paths, library messages) for the server log, the audit record and the CLI.
    """

    status = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message

    def diagnostics(self) -> str:
        return self.detail


class QuotaExceeded(GatewayError):
    """The caller exceeded a quota or budget."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class AuditUnavailable(GatewayError):
    """The audit record could not be made durable; the call must not be served."""

    status = grpc.StatusCode.UNAVAILABLE
