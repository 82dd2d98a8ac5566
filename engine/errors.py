"""The two error classes at the engine boundary (vLLM v1 style): recoverable and fatal."""

from __future__ import annotations


class RequestError(ValueError):
    """Bad input from a caller: the request is refused, the engine keeps running.

    `field` names the offending field (dotted path) so servers can map it to
    INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION with a precise message.
    """

    def __init__(self, message: str, field: str = "", code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.field = field
        self.code = code

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
    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message, field, code="RESOURCE_EXHAUSTED")


class ModelError(ValueError):
    """A model directory that cannot be served: names the file/tensor and what to do."""


class EngineDeadError(RuntimeError):
    """The engine thread failed; every pending and future request gets INTERNAL."""
