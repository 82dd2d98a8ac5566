"""The HTTP front end: an OpenAI-compatible API served by uvicorn on the gRPC server's own event loop.

Starlette + uvicorn rather than FastAPI: every request body is checked by hand (openai_params.py) so
that a bad field is a 400 in OpenAI's error shape naming the OpenAI parameter; FastAPI's pydantic
layer answers 422 in a shape of its own, which would have to be caught and rewritten everywhere.
The HTTP server shares the App (engine, job store, metrics, in-flight set, drain) with gRPC: one
engine, one copy of the weights. Same API key (Bearer) and TLS certificate as gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zostream.engine.data import MAX_NESTING, too_deep
from zostream.engine.errors import RequestError

log = logging.getLogger("zostream.http")

# RequestError.code -> (HTTP status, OpenAI error type)
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "INTERNAL": (500, "server_error"),
}
OPEN_PATHS = ("/health", "/ready", "/v1/health")  # load balancers probe these without a key


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param or None, "code": code}}


def request_error_response(exc: RequestError) -> JSONResponse:
    """The refusal as OpenAI's error object; `code` is the error's stable reason (lower case), and a
    retryable refusal (429, 503) says when to retry in Retry-After, as the gRPC RetryInfo does."""
    status, kind = STATUS.get(exc.code, (400, "invalid_request_error"))
    msg = str(exc.args[0]) if exc.args else str(exc)
    reason = getattr(exc, "reason", "") or exc.code
    code = "model_not_found" if exc.field == "model" and exc.code == "NOT_FOUND" else reason.lower()
    retry = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry else None
    return JSONResponse(error_body(msg, kind, exc.field, code), status_code=status, headers=headers)


def error_sse(exc: BaseException) -> bytes:
    """A failure after a stream started: one last SSE event carrying the error object."""
    if isinstance(exc, RequestError):
        body = error_body(
            str(exc.args[0]) if exc.args else str(exc),
            STATUS.get(exc.code, (500, "server_error"))[1],
            exc.field,
            (getattr(exc, "reason", "") or exc.code).lower(),
        )
    else:
        body = error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal")
    return f"data: {json.dumps(body)}\n\n".encode()


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")  # once: the depth check and the parser read the same text
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not UTF-8 JSON ({exc})", "body") from None
    if too_deep(text):  # json.loads would recurse to Python's limit
        raise RequestError(f"the request body nests JSON more than {MAX_NESTING} levels deep", "body")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})", "body") from None
    except ValueError as exc:  # an integer past int_max_str_digits
        raise RequestError(f"the request body is not valid JSON ({str(exc)[:160]})", "body") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", "body")
    return body


class Guard:
    """ASGI middleware: the API key on everything but health; a bug is logged (and answered 500)."""

    def __init__(self, inner: Any, app: Any) -> None:
        self.inner, self.app = inner, app
        self.key = app.cfg.api_key.encode() if app.cfg.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            token = got[7:] if got[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):  # constant time
                msg = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                body = error_body(msg, "authentication_error", None, "invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        try:
            await self.inner(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - Starlette already answered 500; log it, serve on
            self.app.log_exception(exc)


def build(app: Any) -> Any:
    """The ASGI application over the shared App."""
    from . import openai_api, openai_checkpoints, openai_files, openai_jobs

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})  # liveness: the process answers

    async def ready(request: Request) -> Response:
        # readiness: the model is open and the server is not draining (SIGTERM)
        if app.engine is not None and not app.draining:
            return JSONResponse({"status": "ready"})
        why = "draining" if app.draining else app.engine_error or "loading the model"
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503)

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        msg = f"{request.method} {request.url.path}: " + ("no such route" if code == 404 else "not allowed")
        return JSONResponse(error_body(msg, "invalid_request_error", None, "unknown_url"), status_code=code)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        *openai_api.routes(app),
        *openai_files.routes(app),
        *openai_jobs.routes(app),
        *openai_checkpoints.routes(app),
    ]

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return request_error_response(exc)

    async def internal(request: Request, exc: Exception) -> Response:
        body = error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal")
        return JSONResponse(body, status_code=500)

    handlers = {404: not_found, 405: not_found, RequestError: refused, Exception: internal}
    star = Starlette(routes=routes, exception_handlers=handlers)
    return Guard(star, app)


class HttpServer:
    """uvicorn on the running event loop; `port` is the bound one (0 asks the OS for a free port)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        cfg = app.cfg
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            why = f"--http-port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick a free port"
            raise OSError(exc.errno, why) from None
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            build(app),
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=cfg.tls_cert,
            ssl_keyfile=cfg.tls_key,
            timeout_graceful_shutdown=5,
        )
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()  # raises why it did not start

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)
        self.sock.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The gRPC server's loop owns SIGTERM / SIGINT and drains both front ends.
        yield
