"""The server's interceptors: API-key authentication, and request messages parsed inside the call (so a
malformed one is INVALID_ARGUMENT, not grpc's UNKNOWN / INTERNAL)."""

from __future__ import annotations

import hmac
import inspect

import grpc

from . import status as S


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """With an API key, every RPC except health needs `authorization: Bearer <key>`."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        token = got[7:] if isinstance(got, str) and got.startswith("Bearer ") else ""
        if hmac.compare_digest(token.encode(), self.key):  # constant time
            return handler
        return _deny(handler)


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """A request that is not a valid protobuf message (corrupt wire format, invalid UTF-8 in a string
    field) gets INVALID_ARGUMENT. grpc would answer UNKNOWN or INTERNAL: it parses before the handler
    runs. Here handlers receive the raw bytes and the message is parsed inside the call."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _parsing(handler)


async def _parse(parse, raw: bytes, context):
    try:
        return parse(raw)
    except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a custom deserializer raises
        msg = f"the request is not a valid message: {exc}"
        await S.abort(context, S.rich_status("INVALID_ARGUMENT", msg, "MALFORMED_REQUEST"))


def _parsing(handler):
    parse = handler.request_deserializer
    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    gen = inspect.isasyncgenfunction(behavior)
    if not gen and not inspect.iscoroutinefunction(behavior):
        return handler  # a sync handler: grpc runs it in a thread; leave it as it is
    streaming_in = handler.stream_unary is not None or handler.stream_stream is not None

    async def requests(raw_iter, context):
        async for raw in raw_iter:
            yield await _parse(parse, raw, context)

    async def arg(raw, context):
        return requests(raw, context) if streaming_in else await _parse(parse, raw, context)

    if gen:

        async def call(raw, context):
            async for item in behavior(await arg(raw, context), context):
                yield item
    else:

        async def call(raw, context):
            return await behavior(await arg(raw, context), context)

    make = (
        grpc.unary_unary_rpc_method_handler if handler.unary_unary else
        grpc.unary_stream_rpc_method_handler if handler.unary_stream else
        grpc.stream_unary_rpc_method_handler if handler.stream_unary else
        grpc.stream_stream_rpc_method_handler
    )  # fmt: skip
    return make(call, **kw)


def _deny(handler):
    msg = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"

    st = S.rich_status("UNAUTHENTICATED", msg, "API_KEY_INVALID")

    async def unary(request, context):
        await S.abort(context, st)

    async def stream(request, context):
        await S.abort(context, st)
        yield  # pragma: no cover

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)
