"""Failed calls as google.rpc.Status with details (AIP-193), sent in `grpc-status-details-bin`.

Every failure carries an ErrorInfo (reason: a stable UPPER_SNAKE code; domain "zostream"; metadata
"field" when one field is at fault). A failure tied to a request field also carries a BadRequest
with one FieldViolation naming its dotted path (e.g. "sampling.top_p"); RESOURCE_EXHAUSTED and
UNAVAILABLE carry a RetryInfo saying how long to wait. The status message stays readable on its own.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from zostream.engine.errors import RequestError

DOMAIN = "zostream"
# RequestError.field values that name no request field (the server's state, the request as a whole).
NOT_A_FIELD = ("", "server", "request")
RETRYABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")
DEFAULT_RETRY_S = 1.0


def grpc_code(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


def rich_status(
    code: str,
    message: str,
    reason: str = "",
    field: str = "",
    description: str = "",
    retry_after_s: float | None = None,
) -> status_pb2.Status:
    """The google.rpc.Status of a failed call; `description` is the field violation's text."""
    st = status_pb2.Status(code=code_pb2.Code.Value(code), message=message)
    info = error_details_pb2.ErrorInfo(reason=reason or code, domain=DOMAIN)
    if field and field not in NOT_A_FIELD:
        info.metadata["field"] = field
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=field, description=description or message)
        _pack(st, bad)
    _pack(st, info)
    if code in RETRYABLE:
        delay = DEFAULT_RETRY_S if retry_after_s is None else retry_after_s
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(delay)))
        retry.retry_delay.nanos = int(round((delay - int(delay)) * 1e9))
        _pack(st, retry)
    return st


def _pack(st: status_pb2.Status, msg) -> None:
    a = any_pb2.Any()
    a.Pack(msg)
    st.details.append(a)


def from_request_error(exc: RequestError) -> status_pb2.Status:
    msg = str(exc)
    bare = str(exc.args[0]) if exc.args else msg
    retry = exc.retry_after_s if exc.code in RETRYABLE else None
    return rich_status(exc.code, msg, exc.reason, exc.field, bare, retry)


def trailers(st: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    return (("grpc-status-details-bin", st.SerializeToString()),)


async def abort(context, st: status_pb2.Status) -> None:
    """End the call with `st` (raises grpc.aio's AbortError, as context.abort does)."""
    await context.abort(grpc_code(code_pb2.Code.Name(st.code)), st.message, trailing_metadata=trailers(st))
