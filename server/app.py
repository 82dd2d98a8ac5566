"""The server: grpc.aio + health + reflection + auth, one engine thread, /metrics, SIGTERM drain."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zostream.engine.config import EngineConfig
from zostream.engine.errors import RequestError, ResourceExhaustedError
from zostream.engine.jobs import JobStore
from zostream.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    finetuning_pb2,
    finetuning_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)

from .adapters_service import Adapters
from .finetuning_service import FineTuning
from .generation_service import TextGeneration
from .interceptors import AuthInterceptor, DecodeInterceptor

log = logging.getLogger("zostream.server")
SERVICES = ("zostream.v1.TextGeneration", "zostream.v1.FineTuning", "zostream.v1.Adapters")


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    data_dir: str
    port: int = 50051
    host: str = "127.0.0.1"
    metrics_port: int | None = 9400  # None: no /metrics endpoint
    metrics_addr: str = "127.0.0.1"
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_inflight: int = 256
    drain_seconds: float = 20.0
    http_port: int | None = None  # the OpenAI-compatible HTTP API on the same engine; None: off


class App:
    """Shared state between the servicers (asyncio thread) and the engine thread."""

    def __init__(self, cfg: ServerConfig) -> None:
        from zostream.engine.metrics import Metrics

        self.cfg = cfg
        self.jobs = JobStore(cfg.data_dir)
        self.metrics = Metrics()
        self.engine = None
        self.runner = None
        self.adapters = None  # engine/stored_adapters.py, once the engine is up
        self.engine_error: str | None = None
        self.inflight: set[str] = set()
        self.groups: dict[str, list[str]] = {}  # request id -> its completions' engine ids (n > 1)
        self.max_inflight = cfg.max_inflight
        self.draining = False
        self.stopped = threading.Event()
        self.device_name = "cpu"
        self.health = health.aio.HealthServicer()
        self._thread = threading.Thread(target=self._engine_main, name="zostream-engine", daemon=True)

    # ---- used by servicers -------------------------------------------------------------------
    def ready_engine(self):
        if self.engine is None:
            if self.engine_error:
                raise RequestError(
                    f"the engine failed to start: {self.engine_error}",
                    "server",
                    code="FAILED_PRECONDITION",
                    reason="ENGINE_FAILED",
                )
            # UNAVAILABLE: transient, clients retry it (FAILED_PRECONDITION tells them not to).
            raise RequestError(
                "the engine is still loading the model; retry when health is SERVING",
                "server",
                code="UNAVAILABLE",
                reason="ENGINE_LOADING",
                retry_after_s=2.0,
            )
        return self.engine

    def check_open(self, field: str = "request") -> None:
        """New work is refused while the server drains (SIGTERM)."""
        if self.draining:
            raise RequestError(
                "the server is shutting down; retry on another replica",
                field,
                code="UNAVAILABLE",
                reason="SERVER_DRAINING",
                retry_after_s=1.0,
            )

    def admit(self, reqs: list, track: list[str], field: str = "request", wire=None) -> None:
        """The one admission of generation requests, gRPC and HTTP alike: draining, the in-flight limit,
        unique ids (`track`: the ids the caller holds in flight: a gRPC call's request id, or each of an
        OpenAI call's choices), then Engine.submit's own checks (lengths, adapter, queue) per request.
        On a refusal the requests already submitted are aborted; `wire` maps the engine's errors."""
        engine = self.ready_engine()
        self.check_open(field)
        if len(self.inflight) + len(track) > self.max_inflight:
            raise ResourceExhaustedError(
                f"{len(self.inflight)} requests in flight; retry later", field, reason="TOO_MANY_IN_FLIGHT"
            )
        if dup := next((t for t in track if t in self.inflight), None):  # Abort addresses requests by id
            raise RequestError(
                f"a request with id {dup[:64]!r} is already in flight; use a unique id",
                "request_id",
                code="ALREADY_EXISTS",
            )
        submitted: list[str] = []
        try:
            for r in reqs:
                engine.submit(r)
                submitted.append(r.request_id)
        except RequestError as exc:
            for rid in submitted:
                engine.abort(rid)
            raise (wire(exc) if wire else exc) from None
        self.inflight.update(track)

    async def on_engine(self, fn):
        """Run fn on the engine thread and await its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)

        self.ready_engine().call_soon(call)
        return await asyncio.wrap_future(fut)

    def request_done(self, req, ev, ttft: float | None = None, api: str = "grpc") -> None:
        self.metrics.observe_request_done(
            time.monotonic() - req.arrival, ev.completion_tokens, ev.finish_reason.value, ttft_s=ttft, api=api
        )

    def log_exception(self, exc: BaseException) -> None:
        log.error("internal error: %s", "".join(traceback.format_exception(exc)))

    # ---- engine thread ----------------------------------------------------------------------
    def start_engine(self) -> None:
        self._thread.start()

    def _engine_main(self) -> None:
        from zostream.engine.engine import Engine
        from zostream.engine.job_runner import JobRunner
        from zostream.engine.loop import EngineLoop
        from zostream.engine.stored_adapters import StoredAdapters

        try:
            engine = Engine(self.cfg.engine)
            self.runner = JobRunner(engine, self.jobs, on_log_bytes=self.metrics.add_log_bytes)
            self.adapters = StoredAdapters.load(engine, self.jobs)
            if engine.device.type == "cuda":
                import torch

                self.device_name = torch.cuda.get_device_name(engine.device)
            plan = engine.streamer.plan
            self.metrics.set_residency(len(plan.resident), len(plan.streamed))
            self.metrics.set_kv_blocks(engine.scheduler.kv.used, engine.scheduler.kv.free)
            from zostream import __version__

            self.metrics.set_build_info(
                __version__,
                Path(self.cfg.engine.model_dir).name,
                engine.spec.model_type,
                self.cfg.engine.codec.name,
                str(engine.device),
            )
            self.engine = engine
            log.info(
                "engine ready: %s (%s weights) computing in %s on %s",
                Path(self.cfg.engine.model_dir).name,
                str(engine.store.dtype).removeprefix("torch."),
                str(engine.dtype).removeprefix("torch."),
                self.cfg.engine.device if self.cfg.engine.device == "emu" else str(engine.device),
            )
        except Exception as exc:  # noqa: BLE001
            self.engine_error = f"{type(exc).__name__}: {exc}"
            log.error("engine failed to start: %s", self.engine_error)
            return
        EngineLoop(engine, self.runner, self.metrics).run(self.stopped)


async def serve(
    cfg: ServerConfig, ready: threading.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    app = App(cfg)
    interceptors = [AuthInterceptor(cfg.api_key)] if cfg.api_key else []
    interceptors.append(DecodeInterceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", 8 * 2**20), ("grpc.max_send_message_length", 8 * 2**20)],
    )
    generation_pb2_grpc.add_TextGenerationServicer_to_server(TextGeneration(app), server)
    finetuning_pb2_grpc.add_FineTuningServicer_to_server(FineTuning(app), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(Adapters(app), server)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    names = (
        generation_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name,
        finetuning_pb2.DESCRIPTOR.services_by_name["FineTuning"].full_name,
        adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    for svc in ("", *SERVICES):
        await app.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    addr = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    await server.start()
    if cfg.metrics_port is not None:
        app.metrics.start_http(cfg.metrics_port, cfg.metrics_addr)
    app.bound_port = port
    http = None
    if cfg.http_port is not None:
        from .http_app import HttpServer

        http = HttpServer(app, cfg.host, cfg.http_port)
        await http.start()
        app.http_port = http.port
    log.info("listening on %s:%d (metrics %s)", cfg.host, port, cfg.metrics_port)
    app.start_engine()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests)
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.app = app  # type: ignore[attr-defined]
    serving = False
    while not stop.is_set():
        if not serving and app.engine is not None:
            for svc in ("", *SERVICES):
                await app.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
            serving = True
            app.metrics.set_engine_up(True)
            print(f"zostream: serving on {cfg.host}:{port}", flush=True)
            if http is not None:
                print(f"zostream: OpenAI-compatible HTTP API on {cfg.host}:{http.port}", flush=True)
        if ready is not None and (serving or app.engine_error):
            ready.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    await _drain(app)
    if http is not None:
        await http.stop()
    await server.stop(grace=2.0)
    app.stopped.set()
    app._thread.join(timeout=60)
    app.metrics.close()


async def _drain(app: App) -> None:
    """SIGTERM: refuse new work, let in-flight generations finish, then cancel the rest."""
    app.draining = True
    app.metrics.set_engine_up(False)
    for svc in ("", *SERVICES):
        await app.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.monotonic() + app.cfg.drain_seconds
    while app.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if app.engine is not None:
        for rid in list(app.inflight):
            app.engine.abort(rid)  # their streams end with a final CANCELLED message
    t0 = time.monotonic()
    while app.inflight and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.05)


def run_forever(cfg: ServerConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(cfg))


def launch_in_thread(cfg: ServerConfig) -> tuple[threading.Event, Any]:
    """For tests: start a server in a background thread without waiting for it.

    Returns (ready, stop): `ready.app` appears once the port is bound and `ready` is set once
    health is SERVING (or the engine failed); stop() drains the server and joins the thread.
    """
    ready = threading.Event()
    holder: dict[str, Any] = {}
    loop_ready = threading.Event()

    def main() -> None:
        async def run() -> None:
            holder["loop"] = asyncio.get_running_loop()
            holder["stop"] = asyncio.Event()
            loop_ready.set()
            await serve(cfg, ready, holder["stop"])

        asyncio.run(run())

    t = threading.Thread(target=main, daemon=True)
    t.start()
    loop_ready.wait(30)

    def stop() -> None:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        t.join(timeout=60)

    return ready, stop


def start_in_thread(cfg: ServerConfig, timeout: float = 120.0) -> tuple[Any, Any]:
    """For tests: run a server in a background thread; returns (app, stop function) once ready."""
    ready, stop = launch_in_thread(cfg)
    if not ready.wait(timeout):
        stop()
        raise TimeoutError("server did not become ready")
    return ready.app, stop  # type: ignore[attr-defined]
