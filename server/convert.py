"""Wire types (pb2) meet engine types in the convert*.py modules, one per message family (generation,
jobs, adapters); validation errors name the field. This one holds what they share: timestamps, the
engine-to-request field names of errors, ids, paging."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from zostream import defaults as D
from zostream.engine.errors import RequestError

MAX_ID_CHARS = D.MAX_ID_CHARS


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    if seconds:
        t.FromNanoseconds(int(seconds * 1e9))
    return t


# Engine field names -> request field paths (RequestError.field as the client sees it).
WIRE_FIELDS = {
    "prompt_token_ids": "token_ids",
    "max_new_tokens": "stopping.max_new_tokens",
    "messages": "chat",
    "continue_final_message": "chat.continue_final_message",
}


def wire_error(exc: RequestError, fields: dict[str, str] = WIRE_FIELDS, prefix: str = "") -> RequestError:
    """The same error (class of status, message) naming the request's field instead of the engine's."""
    field = prefix + fields.get(exc.field, exc.field) if exc.field else ""
    msg = str(exc.args[0]) if exc.args else str(exc)
    return RequestError(msg.removeprefix(f"{exc.field}: ") if exc.field else msg, field, code=exc.code)


def check_id(value: str, field: str) -> str:
    if len(value) > MAX_ID_CHARS or any(ord(c) < 32 for c in value):
        raise RequestError(f"must be at most {MAX_ID_CHARS} printable characters", field)
    return value


def page(items: list, page_size: int, token: str, rpc: str, field: str = "page_token") -> tuple[list, str]:
    """One page of `items` for the list RPC `rpc` (its documented default page size)."""
    size = min(page_size or D.PAGE_SIZE[rpc], D.MAX_PAGE_SIZE)
    try:
        start = int(token) if token else 0
    except ValueError:
        raise RequestError("is not a token from a previous response", field) from None
    if start < 0 or start > len(items):
        raise RequestError("is out of range", field)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else "")
