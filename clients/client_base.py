"""The client's connection and call plumbing: channel, API key, deadlines, UNAVAILABLE retries with
backoff, paging; messages as dicts. The per-service calls (client_generation.py, client_jobs.py,
client_adapters.py) build on it; users import ZostreamClient from client.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zostream.clients.errors import ZostreamError, from_rpc_error
from zostream.v1 import adapters_pb2_grpc, finetuning_pb2_grpc, generation_pb2_grpc

CHUNK_BYTES = 1 << 20  # upload / import message size (the API's recommended maximum)
_BACKOFF_CAP_S = 5.0
# Let the channel retry a dead connection about as often as we retry calls (gRPC's default first
# reconnect backoff is 1 s, which would make our early retries fail fast without trying).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 << 20),
]
PathOrBytes = str | os.PathLike[str] | bytes


def to_dict(msg: Message) -> dict[str, Any]:
    """A message as a dict: proto field names, fields without presence always present, int64 as int."""
    return json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


_error = from_rpc_error


def enum_number(enum: Any, prefix: str, value: str | int, what: str) -> int:
    """'cosine', 'COSINE', 'LR_SCHEDULE_COSINE' or 2 -> the enum number; ValueError naming `what`."""
    if isinstance(value, int):
        return value
    name = value.upper()
    name = name if name.startswith(prefix) else prefix + name
    try:
        return enum.Value(name)
    except ValueError:
        known = [
            n.removeprefix(prefix).lower()
            for n in enum.DESCRIPTOR.values_by_name
            if not n.endswith("UNSPECIFIED")
        ]
        raise ValueError(f"{what}: expected one of {', '.join(known)}, got {value!r}") from None


def file_chunks(data: PathOrBytes) -> Iterator[bytes]:
    if isinstance(data, bytes):
        for i in range(0, len(data), CHUNK_BYTES):
            yield data[i : i + CHUNK_BYTES]
        return
    with open(data, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            yield block


class ClientBase:
    """One channel to one zostream server and the retrying calls over it. Use as a context manager or
    call close()."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        timeout: float | None = 60.0,
        retries: int = 3,
        backoff_s: float = 0.2,
    ) -> None:
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(address, creds, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._gen = generation_pb2_grpc.TextGenerationStub(self._channel)
        self._ft = finetuning_pb2_grpc.FineTuningStub(self._channel)
        self._ad = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- call plumbing -------------------------------------------------------------------------
    def _sleep(self, attempt: int, exc: ZostreamError | None = None) -> None:
        """Exponential backoff, at least the server's RetryInfo advice (both capped)."""
        hint = exc.retry_after_s if exc is not None and exc.retry_after_s is not None else 0.0
        time.sleep(min(max(self.backoff_s * 2**attempt, hint), _BACKOFF_CAP_S))

    def _unary(
        self, method: Callable[..., Any], request: Any | Callable[[], Any], timeout: float | None = None
    ) -> Any:
        """Unary or client-streaming call; a callable `request` makes a fresh request iterator per try."""
        for attempt in range(self.retries + 1):
            req = request() if callable(request) else request
            try:
                return method(req, metadata=self._metadata, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                err = _error(exc)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise err from None
            self._sleep(attempt, err)
        raise AssertionError("unreachable")

    def _stream(
        self, method: Callable[..., Any], request: Any, timeout: float | None = None, *, bounded: bool = True
    ) -> Iterator[Any]:
        """Server-streaming call, retried on UNAVAILABLE until its first message; closing cancels it.

        `bounded` False: no deadline unless `timeout` is given (a generation may outlast any default)."""
        deadline = timeout or (self.timeout if bounded else None)
        attempt = 0
        while True:
            call = method(request, metadata=self._metadata, timeout=deadline)
            received = False
            try:
                for msg in call:
                    received = True
                    yield msg
                return
            except grpc.RpcError as exc:
                err = _error(exc)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or received or attempt >= self.retries:
                    raise err from None
            finally:
                call.cancel()  # no-op after the end; aborts the server's work when the caller stops early
            self._sleep(attempt, err)
            attempt += 1

    def _pages(self, method: Callable[..., Any], request: Any, field: str) -> Iterator[dict[str, Any]]:
        while True:
            response = self._unary(method, request)
            yield from (to_dict(m) for m in getattr(response, field))
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    # ---- health --------------------------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of `service` ("" = the whole server): "SERVING", "NOT_SERVING", ..."""
        r = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
