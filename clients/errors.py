"""Typed exceptions for failed zostream calls, carrying the google.rpc.Status details the server sends.

    try:
        client.generate("hi", top_p=2)
    except InvalidArgumentError as exc:
        exc.field_violations  # [FieldViolation(field="sampling.top_p", description="must be in (0, 1]")]
        exc.reason            # "INVALID_ARGUMENT"
    except ResourceExhaustedError as exc:
        time.sleep(exc.retry_after_s or 1)

Imports grpc and protobuf only (a client-only install has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its dotted path (e.g. "hyperparameters.lora.r") and what is wrong."""

    field: str
    description: str


class ZostreamError(Exception):
    """A failed call: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `message` its details.

    From the status details: `reason` (ErrorInfo.reason, a stable UPPER_SNAKE code), `metadata`
    (ErrorInfo.metadata), `field_violations` (BadRequest), `retry_after_s` (RetryInfo; None when the
    server gave no advice). `field`: the first violation's field, "" when none.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or code
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_after_s = retry_after_s

    @property
    def field(self) -> str:
        return self.field_violations[0].field if self.field_violations else self.metadata.get("field", "")


class InvalidArgumentError(ZostreamError):
    pass


class NotFoundError(ZostreamError):
    pass


class AlreadyExistsError(ZostreamError):
    pass


class FailedPreconditionError(ZostreamError):
    pass


class ResourceExhaustedError(ZostreamError):
    pass


class UnavailableError(ZostreamError):
    pass


class UnauthenticatedError(ZostreamError):
    pass


class DeadlineExceededError(ZostreamError):
    pass


class InternalError(ZostreamError):
    pass


BY_CODE: dict[str, type[ZostreamError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "INTERNAL": InternalError,
}


def error(code: str, message: str, **details: Any) -> ZostreamError:
    """The exception class for `code` (ZostreamError itself for codes without one)."""
    return BY_CODE.get(code, ZostreamError)(code, message, **details)


def status_details(trailing_metadata: Any) -> dict[str, Any]:
    """reason / metadata / field_violations / retry_after_s from a call's trailing metadata."""
    raw = next((v for k, v in trailing_metadata or () if k == DETAILS_KEY), None)
    if raw is None:
        return {}
    st = status_pb2.Status.FromString(raw)
    out: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for any_ in st.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            out["reason"], out["metadata"] = info.reason, dict(info.metadata)
        elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_.Unpack(retry)
            out["retry_after_s"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    if violations:
        out["field_violations"] = tuple(violations)
    return out


def from_rpc_error(exc: grpc.RpcError) -> ZostreamError:
    code = exc.code() if hasattr(exc, "code") else None
    message = exc.details() if hasattr(exc, "details") else None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    try:
        details = status_details(trailing)
    except Exception:  # noqa: BLE001 - undecodable details: the code and message still stand
        details = {}
    return error(code.name if code is not None else "UNKNOWN", message or str(exc), **details)
