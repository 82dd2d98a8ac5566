"""The two error classes at the engine boundary (vLLM v1 style): recoverable and fatal."""

from __future__ import annotations


class RequestError(ValueError):
    """Bad input from a caller: the request is refused, the engine keeps running.

    `field` names the offending field (dotted path) so servers can map it to
    INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION with a precise message. `reason` is a stable
    UPPER_SNAKE code a client can branch on (default: the status code's name); `retry_after_s` how
    long a client should wait before retrying (RESOURCE_EXHAUSTED / UNAVAILABLE; None: not retryable
    or no advice).
    """

    def __init__(
        self,
        message: str,
        field: str = "",
        code: str = "INVALID_ARGUMENT",
        reason: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.code = code
        self.reason = reason or code
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{self.field}: {msg}" if self.field and not msg.startswith(self.field) else msg


class NotFoundError(RequestError):
    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message, field, code="NOT_FOUND")


class PreconditionError(RequestError):
    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message, field, code="FAILED_PRECONDITION")


class ResourceExhaustedError(RequestError):
    def __init__(
        self, message: str, field: str = "", reason: str = "", retry_after_s: float | None = 1.0
    ) -> None:
        super().__init__(message, field, "RESOURCE_EXHAUSTED", reason, retry_after_s)


class ModelError(ValueError):
    """A model directory that cannot be served: names the file/tensor and what to do."""


class EngineDeadError(RuntimeError):
    """The engine thread failed; every pending and future request gets INTERNAL."""
