"""The Adapters service: list, get, delete, download weights, import PEFT files, export and import update
logs."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from zostream.engine import finetune
from zostream.engine.errors import NotFoundError, PreconditionError, RequestError
from zostream.engine.jobs import check_name
from zostream.engine.update_log import UpdateLog, read_header
from zostream.v1 import adapters_pb2, adapters_pb2_grpc

from . import convert as C
from . import convert_adapters as CA
from . import weights as W
from .rpc import read_upload, rpc

CHUNK = 1 << 20
MAX_LOG_BYTES = 64 * 2**20


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
        return CA.adapter_pb(
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
        if ":" in request.adapter_id:  # a checkpoint id: served on first use, not listed
            return self._checkpoint(request.adapter_id)
        raise NotFoundError(f"no adapter {request.adapter_id[:64]!r}", "adapter_id")

    def _checkpoint(self, aid: str) -> adapters_pb2.Adapter:
        """`<job_id>:ckpt-step-<N>` (engine/checkpoints.py): step N of a LoRA job, rebuilt from its log."""
        e = self.app.ready_engine()
        job_id, step = e.adapter_source.check(aid, "adapter_id")
        rec, log = self.app.jobs.get(job_id), self.app.jobs.job_dir(job_id) / "update.log"
        if not log.exists():
            raise NotFoundError(f"job {job_id!r} has no update log", "adapter_id")
        h = read_header(log)
        lora = {k: h.scope[k] for k in ("r", "alpha", "targets")}
        size = log.stat().st_size  # nothing stored but the job's log
        ready = adapters_pb2.ADAPTER_STATUS_READY
        return CA.adapter_pb(
            aid, "lora", h.base_fingerprint, step, job_id, rec.created_at, size, ready, lora, size
        )

    @rpc
    async def DeleteAdapter(self, request, context):
        aid = request.adapter_id
        if ":" in aid:
            raise PreconditionError("a checkpoint id names a step of a job, not stored files", "adapter_id")
        await self.GetAdapter(request, context)
        if aid in self.app.jobs.jobs:
            rec = self.app.jobs.get(aid)
            if not rec.terminal:
                raise PreconditionError("the job is still training; cancel it first", "adapter_id")

        await self.app.on_engine(lambda: self.app.adapters.delete(aid))  # the engine owns the adapters
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
                await self.app.on_engine(lambda: self.app.adapters.import_peft(aid, staged))
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
        meta, data = await read_upload(request_iterator, "adapter_id", MAX_LOG_BYTES, "update logs")
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
            # The replay (steps x LoRA tensors: minutes for a long log) runs off the engine thread, which
            # goes on generating; serving the result is the engine thread's.
            adapter = await asyncio.to_thread(self.app.adapters.replay_log, tmp / "update.log")
            await self.app.on_engine(lambda: self.app.adapters.serve(aid, adapter))
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
