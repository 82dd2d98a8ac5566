"""Thin gRPC servicers: decode the request, call the engine, encode the answer."""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import shutil
import time
from pathlib import Path
from typing import Any

import grpc

from zostream import __version__
from zostream.engine import data as D
from zostream.engine import finetune
from zostream.engine.errors import NotFoundError, PreconditionError, RequestError, ResourceExhaustedError
from zostream.engine.jobs import MAX_DATASET_BYTES, check_name
from zostream.engine.update_log import UpdateLog, read_header
from zostream.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    finetuning_pb2,
    finetuning_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)

from . import convert as C
from . import status as S
from . import weights as W

CHUNK = 1 << 20
MAX_LOG_BYTES = 64 * 2**20
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

    async def fail(exc: Exception, context) -> None:
        if isinstance(exc, RequestError):
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
                if not isinstance(exc, RequestError):
                    self.app.log_exception(exc)
                else:
                    self.app.metrics.reject(exc.reason)
                await fail(exc, context)

        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, RequestError):
                self.app.log_exception(exc)
            else:
                self.app.metrics.reject(exc.reason)
            await fail(exc, context)

    return unary


class _Acc:
    """One completion's output so far, for a non-streamed Generate."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.lps: list = []
        self.plps: tuple = ()
        self.n_tokens = 0

    def add(self, ev) -> None:
        self.texts.append(ev.text)
        self.ids.extend(ev.token_ids)
        self.lps.extend(ev.logprobs)
        self.plps = self.plps or ev.prompt_logprobs


class TextGeneration(generation_pb2_grpc.TextGenerationServicer):
    def __init__(self, app: Any) -> None:
        self.app = app

    @rpc
    async def Generate(self, request, context):
        engine = self.app.ready_engine()
        req = C.generate_request(request, engine, context.time_remaining())
        subs = C.completions(req, request.n)  # n > 1: one engine request per completion
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, sub in enumerate(subs):
            sub.callback = lambda ev, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
        self.app.admit(subs, [req.request_id], wire=C.wire_error)
        submitted = [sub.request_id for sub in subs]
        self.app.groups[req.request_id] = submitted
        # Per completion: first-token latency, and (not streaming) what it produced so far.
        first: list[float | None] = [None] * len(subs)
        last: list[float | None] = [None] * len(subs)  # when each completion's previous token came
        acc = [_Acc() for _ in subs]
        done = [False] * len(subs)
        try:
            while not all(done):
                i, ev = await queue.get()
                sub, a = subs[i], acc[i]
                a.n_tokens += len(ev.token_ids)
                if ev.token_ids:
                    now = time.monotonic()
                    if first[i] is None:
                        first[i] = now - sub.arrival
                    if last[i] is not None:
                        self.app.metrics.observe_inter_token(now - last[i])
                    last[i] = now
                if ev.finish_reason is not None:
                    done[i] = True
                    self.app.request_done(sub, ev, first[i])
                if request.stream:
                    yield C.generate_response(ev, request_id=req.request_id, index=i)
                    continue
                a.add(ev)
                if ev.finish_reason is not None:  # the final event may carry text held back for a stop
                    yield C.generate_response(
                        ev, "".join(a.texts), a.ids, a.lps, a.plps, request_id=req.request_id, index=i
                    )
        finally:
            self.app.inflight.discard(req.request_id)
            self.app.groups.pop(req.request_id, None)
            for i, sub in enumerate(subs):
                if not done[i]:  # client cancelled or deadline passed: still a finished request
                    engine.abort(sub.request_id)
                    self.app.metrics.observe_request_done(
                        time.monotonic() - sub.arrival, acc[i].n_tokens, "cancelled", ttft_s=first[i]
                    )

    @rpc
    async def Abort(self, request, context):
        engine = self.app.ready_engine()
        for rid in request.request_ids:
            for sub in self.app.groups.get(rid, [rid]):  # every completion of an n > 1 request
                engine.abort(sub)
        return generation_pb2.AbortResponse(
            aborted_request_ids=[r for r in request.request_ids if r in self.app.inflight]
        )

    @rpc
    async def Tokenize(self, request, context):
        engine = self.app.ready_engine()
        if request.WhichOneof("input") is None:
            raise RequestError("set text or chat", "input")
        ids = C.prompt_ids(request, engine)
        return generation_pb2.TokenizeResponse(
            token_ids=ids, tokens=engine.tokenizer.convert_ids_to_tokens(ids)
        )

    @rpc
    async def GetModelInfo(self, request, context):
        e = self.app.ready_engine()
        plan = e.streamer.plan
        return generation_pb2.ModelInfo(
            model_id=Path(e.cfg.model_dir).name,
            family=e.spec.model_type,
            num_layers=e.spec.num_layers,
            num_parameters=e.store.num_parameters(),
            dtype=str(e.store.dtype).removeprefix("torch."),
            compute_dtype=str(e.dtype).removeprefix("torch."),
            vocab_size=e.spec.vocab,
            max_sequence_length=e.limits.max_seq_len,
            max_new_tokens=e.limits.max_new_tokens,
            codec=e.cfg.codec.name,
            device=str(e.device),
            device_name=self.app.device_name,
            gpu_memory_budget_bytes=plan.budget or 0,
            resident_blocks=len(plan.resident),
            streamed_blocks=len(plan.streamed),
            has_chat_template=bool(getattr(e.tokenizer, "chat_template", None)),
            base_fingerprint=e.store.fingerprint,
            eos_token_ids=sorted(e.eos_ids),
            server_version=__version__,
        )


class FineTuning(finetuning_pb2_grpc.FineTuningServicer):
    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def jobs(self):
        return self.app.jobs

    @rpc
    async def UploadDataset(self, request_iterator, context):
        engine = self.app.ready_engine()
        meta, data = await _read_upload(
            request_iterator,
            "name",
            MAX_DATASET_BYTES,
            "datasets",
            check=lambda m: check_name(m.name, "metadata.name"),
        )
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise RequestError(f"dataset is not valid UTF-8 (byte {exc.start})", "chunk") from None
        try:
            ds = await asyncio.to_thread(D.load_records, lines, meta.name, engine.tokenizer, 1 << 16)
        except (RecursionError, ValueError, TypeError, UnicodeError) as exc:
            if isinstance(exc, RequestError):
                raise
            # Hostile JSON the record parser does not name: nesting past the recursion limit, integers past
            # int_max_str_digits, lone surrogates in strings (the tokenizer refuses them).
            why = f"{type(exc).__name__}: {str(exc)[:160]}"
            raise RequestError(
                f"a record cannot be read ({why}); send one flat JSON object per line, with UTF-8 text",
                "chunk",
            ) from None
        if meta.kind and meta.kind != ds.kind:
            raise RequestError(
                f"declared kind {meta.kind!r} but the records are {ds.kind!r}", "metadata.kind"
            )
        n = len(ds.choices) if ds.kind == "choice" else len(ds.examples)
        info = self.jobs.save_dataset(meta.name, data, {"kind": ds.kind, "num_records": n}, meta.overwrite)
        return _dataset_pb(info)

    @rpc
    async def ListDatasets(self, request, context):
        items, token = C.page(
            self.jobs.list_datasets(), request.page_size, request.page_token, "ListDatasets"
        )
        return finetuning_pb2.ListDatasetsResponse(
            datasets=[_dataset_pb(i) for i in items], next_page_token=token
        )

    @rpc
    async def GetDataset(self, request, context):
        return _dataset_pb(self.jobs.get_dataset(request.name))

    @rpc
    async def DeleteDataset(self, request, context):
        self.jobs.delete_dataset(request.name)
        return finetuning_pb2.DeleteDatasetResponse()

    @rpc
    async def DeleteJob(self, request, context):
        rec = self.jobs.get(request.job_id)
        if not rec.terminal:
            raise PreconditionError(f"job {rec.id} is {rec.status}; cancel it first", "job_id")

        await self.app.on_engine(lambda: self.app.runner.delete_job(rec.id))  # the engine owns the adapters
        return finetuning_pb2.DeleteJobResponse()

    @rpc
    async def CreateJob(self, request, context):
        engine = self.app.ready_engine()
        spec = C.job_spec(
            request,
            engine.cfg.codec.name,
            engine.family.module_names(engine.spec),
            str(engine.store.dtype).removeprefix("torch."),
        )
        self.jobs.dataset_path(spec["training_dataset"])
        if spec["validation_dataset"]:
            try:
                self.jobs.dataset_path(spec["validation_dataset"])
            except NotFoundError as exc:
                raise NotFoundError(str(exc).split(": ", 1)[-1], "validation_dataset") from None
        self.app.check_open()
        rec, _created = self.jobs.create(spec)
        engine.call_soon(lambda: None)  # wake the engine loop
        return C.job_pb(rec)

    @rpc
    async def GetJob(self, request, context):
        return C.job_pb(self.jobs.get(request.job_id))

    @rpc
    async def ListJobs(self, request, context):
        bad = [s for s in request.statuses if s not in C.STATUS_NAME]
        if bad:
            raise RequestError(f"unknown status value {bad[0]}", "statuses")
        recs = self.jobs.list(tuple(C.STATUS_NAME[s] for s in request.statuses))[::-1]  # newest first
        items, token = C.page(recs, request.page_size, request.page_token, "ListJobs")
        return finetuning_pb2.ListJobsResponse(jobs=[C.job_pb(r) for r in items], next_page_token=token)

    @rpc
    async def CancelJob(self, request, context):
        rec = self.jobs.get(request.job_id)
        # documented: cancelling a finished job changes nothing
        if self.jobs.request_cancel(rec):
            self.app.ready_engine().call_soon(lambda: None)
        return C.job_pb(rec)

    @rpc
    async def ListJobEvents(self, request, context):
        self.jobs.get(request.job_id)
        items, token = C.page(
            self.jobs.events(request.job_id), request.page_size, request.page_token, "ListJobEvents"
        )
        return finetuning_pb2.ListJobEventsResponse(
            events=[C.event_pb(e) for e in items], next_page_token=token
        )

    @rpc
    async def StreamJobEvents(self, request, context):
        rec = self.jobs.get(request.job_id)
        if request.after_event_id < 0:
            raise RequestError("must be >= 0", "after_event_id")
        last = request.after_event_id
        while True:
            for ev in self.jobs.events(rec.id, last):
                last = ev["id"]
                yield C.event_pb(ev)
            if rec.terminal and not self.jobs.events(rec.id, last):
                return
            await asyncio.to_thread(self.jobs.wait_for_change, 0.5)

    @rpc
    async def ListCheckpoints(self, request, context):
        rec = self.jobs.get(request.job_id)
        d = self.jobs.job_dir(rec.id) / "checkpoints"
        # Checkpoint.metrics: the step event's (and an eval's) metrics at the checkpoint's step.
        at_step: dict[int, dict[str, float]] = {}
        for ev in self.jobs.events(rec.id):
            if ev["type"] in ("step", "eval"):
                at_step.setdefault(ev["step"], {}).update(C.event_metrics(ev))
        cps = []
        for p in sorted(d.glob("step-*")) if d.exists() else []:
            if p.name.endswith(".tmp"):
                continue
            size = sum(f.stat().st_size for f in p.iterdir())
            step = int(p.name.split("-")[1])
            cps.append(
                finetuning_pb2.Checkpoint(
                    name=p.name,
                    step=step,
                    size_bytes=size,
                    created_at=C.ts(p.stat().st_mtime),
                    metrics=at_step.get(step, {}),
                )
            )
        items, token = C.page(cps, request.page_size, request.page_token, "ListCheckpoints")
        return finetuning_pb2.ListCheckpointsResponse(checkpoints=items, next_page_token=token)


async def _read_upload(request_iterator, key: str, limit: int, what: str, check=None) -> tuple[Any, bytes]:
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


def _dataset_pb(info: dict) -> finetuning_pb2.Dataset:
    return finetuning_pb2.Dataset(
        name=info["name"],
        size_bytes=info["size_bytes"],
        num_records=info["num_records"],
        kind=info["kind"],
        created_at=C.ts(info["created_at"]),
        sha256=info["sha256"],
    )


class Adapters(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, app: Any) -> None:
        self.app = app
        self._importing: set[str] = set()  # ids with an ImportUpdateLog in progress

    def _all(self) -> list[adapters_pb2.Adapter]:
        e, jobs = self.app.ready_engine(), self.app.jobs
        out = []
        for rec in jobs.list():
            if rec.spec["method"] != "lora" or rec.id not in e.adapters:
                continue
            log = jobs.job_dir(rec.id) / "update.log"
            status = (
                adapters_pb2.ADAPTER_STATUS_READY
                if rec.status == "succeeded"
                else adapters_pb2.ADAPTER_STATUS_TRAINING
                if not rec.terminal
                else adapters_pb2.ADAPTER_STATUS_STOPPED
            )
            out.append(self._pb(rec.id, rec.id, rec.steps_done, rec.created_at, status, log))
        for d in sorted((jobs.root / "adapters").iterdir()):
            log, peft = d / "update.log", d / "adapter" / "adapter_config.json"
            if d.name in e.adapters and (log.exists() or peft.exists()):  # imported: a log, or PEFT files
                created = (log if log.exists() else peft).stat().st_mtime
                steps = _steps(log) if log.exists() else 0
                out.append(self._pb(d.name, "", steps, created, adapters_pb2.ADAPTER_STATUS_READY, log))
        return out

    def _pb(self, aid, job_id, steps, created, status, log: Path) -> adapters_pb2.Adapter:
        ad = self.app.ready_engine().adapters[aid]
        size = sum(t.numel() * 4 for t in ad.tensors.values())
        lora = {"r": ad.spec.r, "alpha": ad.spec.alpha, "targets": list(ad.spec.targets)}
        # An imported PEFT adapter has no log: it was validated against this base on import.
        fp = read_header(log).base_fingerprint if log.exists() else self.app.ready_engine().store.fingerprint
        return C.adapter_pb(
            aid,
            "lora",
            fp,
            steps,
            job_id,
            created,
            size,
            status,
            lora,
            log.stat().st_size if log.exists() else 0,
        )

    @rpc
    async def ListAdapters(self, request, context):
        newest_first = sorted(self._all(), key=lambda a: (a.created_at.ToNanoseconds(), a.id), reverse=True)
        items, token = C.page(newest_first, request.page_size, request.page_token, "ListAdapters")
        return adapters_pb2.ListAdaptersResponse(adapters=items, next_page_token=token)

    @rpc
    async def GetAdapter(self, request, context):
        for a in self._all():
            if a.id == request.adapter_id:
                return a
        raise NotFoundError(f"no adapter {request.adapter_id[:64]!r}", "adapter_id")

    @rpc
    async def DeleteAdapter(self, request, context):
        aid = request.adapter_id
        await self.GetAdapter(request, context)
        if aid in self.app.jobs.jobs:
            rec = self.app.jobs.get(aid)
            if not rec.terminal:
                raise PreconditionError("the job is still training; cancel it first", "adapter_id")

        await self.app.on_engine(lambda: self.app.runner.delete_adapter(aid))  # the engine owns the adapters
        if aid in self.app.jobs.jobs:
            shutil.rmtree(self.app.jobs.job_dir(aid) / "adapter", ignore_errors=True)
        return adapters_pb2.DeleteAdapterResponse()

    @rpc
    async def DownloadWeights(self, request, context):
        self.app.ready_engine()
        root = await asyncio.to_thread(W.weights_dir, self.app, request)  # upto: a replay
        for chunk in W.stream_dir(root):
            yield chunk

    @rpc
    async def ImportPeftAdapter(self, request_iterator, context):
        engine = self.app.ready_engine()
        meta, data = await W.read_peft_upload(request_iterator)
        aid = meta.adapter_id or f"peft-{int(time.time())}"
        taken = aid in engine.adapters or aid in self.app.jobs.jobs or aid in self._importing
        if taken or (self.app.jobs.root / "adapters" / aid).exists():
            raise RequestError(
                f"adapter {aid!r} exists; delete it first or pick another id",
                "metadata.adapter_id",
                code="ALREADY_EXISTS",
            )
        self._importing.add(aid)
        try:
            staged = W.stage_peft(self.app.jobs.root, aid, data)
            try:
                await self.app.on_engine(lambda: self.app.runner.import_peft(aid, staged))
            except BaseException:
                shutil.rmtree(staged.parent, ignore_errors=True)
                raise
            staged.parent.rename(self.app.jobs.root / "adapters" / aid)
        finally:
            self._importing.discard(aid)
        return await self.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id=aid), context)

    @rpc
    async def ExportUpdateLog(self, request, context):
        which = request.WhichOneof("source")
        if which is None:
            raise RequestError("set adapter_id or job_id", "source")
        ident = getattr(request, which)
        jobs = self.app.jobs
        if ident in jobs.jobs:
            path = jobs.job_dir(ident) / "update.log"
        else:
            check_name(ident, which)
            path = jobs.root / "adapters" / ident / "update.log"
        if not path.exists():
            raise NotFoundError(f"no update log for {ident[:64]!r}", which)
        if request.HasField("upto"):
            out = path.parent / "exports" / f"update-{request.upto:06d}.log"
            data = await asyncio.to_thread(finetune.log_upto, path, request.upto, out)
        else:
            data = path.read_bytes()
        for i in range(0, max(len(data), 1), CHUNK):
            yield adapters_pb2.ExportUpdateLogResponse(chunk=data[i : i + CHUNK], total_bytes=len(data))

    @rpc
    async def ImportUpdateLog(self, request_iterator, context):
        self.app.ready_engine()
        meta, data = await _read_upload(request_iterator, "adapter_id", MAX_LOG_BYTES, "update logs")
        aid = check_name(meta.adapter_id or f"imported-{int(time.time())}", "metadata.adapter_id")
        taken = aid in self.app.ready_engine().adapters or aid in self.app.jobs.jobs or aid in self._importing
        if taken or (self.app.jobs.root / "adapters" / aid).exists():
            raise RequestError(
                f"adapter {aid!r} exists; delete it first or pick another id",
                "metadata.adapter_id",
                code="ALREADY_EXISTS",
            )
        self._importing.add(aid)  # two imports of one id would share (and delete) one staging directory
        try:
            return await self._import(aid, data, context)
        finally:
            self._importing.discard(aid)

    async def _import(self, aid: str, buf: bytes, context) -> adapters_pb2.Adapter:
        d = self.app.jobs.root / "adapters" / aid
        tmp = d.with_name(d.name + ".importing")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "update.log").write_bytes(bytes(buf))
        try:
            with UpdateLog.open(tmp / "update.log", repair=False) as log:
                if log.damage:
                    raise RequestError(f"the log is damaged: {log.damage}", "chunk")
            await self.app.on_engine(lambda: self.app.runner.import_log(aid, tmp / "update.log"))
        except (ValueError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, RequestError):
                raise
            # The message must not name server paths.
            why = str(exc).replace(f"{tmp / 'update.log'}: ", "").replace(str(tmp), "<upload>")
            raise RequestError(f"not a valid update log: {why}", "chunk") from None
        tmp.rename(d)
        return await self.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id=aid), context)


def _steps(log: Path) -> int:
    try:
        with UpdateLog.open(log, repair=False) as lg:
            return len(lg)
    except (ValueError, OSError):
        return 0
