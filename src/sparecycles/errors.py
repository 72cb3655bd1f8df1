"""Two kinds of failure.

Expected failures (a client without balance, no node for a model, a node that left) are
``SpareCyclesError`` subclasses that carry their HTTP status and OpenAI error type, so the API maps
them without a table of special cases. Broken invariants (debits != credits) go through
``invariant()``, which raises ``InvariantViolation`` even under ``python -O``: it is a plain ``if``,
not an ``assert``.
"""

from __future__ import annotations


class SpareCyclesError(Exception):
    """An expected failure with a clear message for whoever caused it."""

    status_code: int = 400
    error_type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(SpareCyclesError):
    status_code = 400


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(SpareCyclesError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(SpareCyclesError):
    status_code = 403
    error_type = "permission_error"


class InsufficientBalance(SpareCyclesError):
    """OpenAI's own shape for it (429, ``insufficient_quota``), so code written for OpenAI
    handles it; answered with ``x-should-retry: false`` so that SDKs do not retry it."""

    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class NotFound(SpareCyclesError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(SpareCyclesError):
    status_code = 413
    code = "request_too_large"


class RateLimited(SpareCyclesError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class NoNodeAvailable(SpareCyclesError):
    status_code = 503
    error_type = "service_unavailable"
    code = "no_node_available"


class JobFailed(SpareCyclesError):
    """A job could not be finished (every node holding its model left, or the node failed)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "job_failed"


class StoreUnavailable(SpareCyclesError):
    """The database did not answer (it is restarting, or out of connections): retry shortly.
    Nothing was accepted, so nothing is charged."""

    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"


class Conflict(SpareCyclesError):
    status_code = 409
    error_type = "conflict_error"


class ProtocolError(SpareCyclesError):
    """A node sent something the protocol does not allow; the node is disconnected."""


class InvariantViolation(RuntimeError):
    """Something that must always hold did not. Never caught to carry on."""


def invariant(condition: bool, message: str) -> None:
    """Stop loudly if ``condition`` is false; unlike ``assert`` this survives ``python -O``."""
    if not condition:
        raise InvariantViolation(message)
