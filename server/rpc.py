"""What every servicer method shares: the @rpc error mapping and the client-streamed upload reader."""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
from typing import Any

import grpc

from zostream.engine.errors import RequestError, ResourceExhaustedError

from . import status as S

_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
}


_DISK = {
    errno.ENOSPC: (grpc.StatusCode.RESOURCE_EXHAUSTED, "no space left on device"),
    errno.EDQUOT: (grpc.StatusCode.RESOURCE_EXHAUSTED, "disk quota exceeded"),
    errno.EACCES: (grpc.StatusCode.FAILED_PRECONDITION, "permission denied"),
    errno.EPERM: (grpc.StatusCode.FAILED_PRECONDITION, "operation not permitted"),
    errno.EROFS: (grpc.StatusCode.FAILED_PRECONDITION, "read-only file system"),
}


def rpc(fn):
    """Map RequestError (and subclasses) to their status; anything else is INTERNAL, logged."""

    async def fail(self, exc: Exception, context) -> None:
        """The one error path of unary and streaming RPCs: count or log `exc`, then abort with its status."""
        if not isinstance(exc, RequestError):
            self.app.log_exception(exc)
        else:
            self.app.metrics.reject(exc.reason)
            if exc.code not in _CODES:
                exc.code = "INVALID_ARGUMENT"
            await S.abort(context, S.from_request_error(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK:  # the data dir, not the request: no paths
            code, why = _DISK[exc.errno]
            msg = f"the server cannot write its data directory ({why}); retry later"
            reason = "DISK_FULL" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else "DATA_DIR_NOT_WRITABLE"
            await S.abort(context, S.rich_status(code.name, msg, reason, retry_after_s=30.0))
        await S.abort(context, S.rich_status("INTERNAL", f"internal error: {type(exc).__name__}", "INTERNAL"))

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001
                await fail(self, exc, context)

        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await fail(self, exc, context)

    return unary


async def read_upload(request_iterator, key: str, limit: int, what: str, check=None) -> tuple[Any, bytes]:
    """A client-streamed upload: metadata first (checked at once), then byte chunks up to `limit`."""
    meta, buf = None, bytearray()
    async for part in request_iterator:
        which = part.WhichOneof("part")
        if meta is None:
            if which != "metadata":
                raise RequestError(f"the first message must carry metadata ({key})", "metadata")
            meta = part.metadata
            if check is not None:
                check(meta)
        elif which == "chunk":
            buf += part.chunk
            if len(buf) > limit:
                raise ResourceExhaustedError(
                    f"{what} are limited to {limit} bytes",
                    "chunk",
                    reason="UPLOAD_TOO_LARGE",
                    retry_after_s=None,
                )
        else:
            raise RequestError("metadata may only be sent first", "metadata")
    if meta is None:
        raise RequestError("no metadata received", "metadata")
    return meta, bytes(buf)
