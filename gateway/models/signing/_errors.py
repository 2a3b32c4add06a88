"""The signing package's error, in the gateway's hierarchy (FAILED_PRECONDITION to callers)."""

from __future__ import annotations

from gateway.errors import ModelUnavailable


class SignatureError(ModelUnavailable):
    """The model may not be served: unsigned, tampered, malformed or untrusted signature.

    The message lists the files that are extra, missing or changed by name, or names the
    trust rule that refused (also in ``rule``, '' when no rule applied). Malformed bundles,
    unsafe manifest names and trust-policy refusals are subclasses of it.
    """

    def __init__(self, message: str, rule: str = "", *, detail: str = "") -> None:
        super().__init__(message, detail=detail)
        self.rule = rule
