"""The FineTuning service: datasets (upload, list, get, delete) and jobs (create, list, cancel, events,
checkpoints)."""

from __future__ import annotations

import asyncio
from typing import Any

from zostream.engine import data as D
from zostream.engine.checkpoints import checkpoint_id
from zostream.engine.errors import NotFoundError, PreconditionError, RequestError
from zostream.engine.jobs import MAX_DATASET_BYTES, check_name
from zostream.v1 import finetuning_pb2, finetuning_pb2_grpc

from . import convert as C
from . import convert_jobs as CJ
from .rpc import read_upload, rpc


class FineTuning(finetuning_pb2_grpc.FineTuningServicer):
    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def jobs(self):
        return self.app.jobs

    @rpc
    async def UploadDataset(self, request_iterator, context):
        engine = self.app.ready_engine()
        meta, data = await read_upload(
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
            # Hostile JSON the record parser does not name: integers past int_max_str_digits, lone surrogates
            # in strings (the tokenizer refuses them); RecursionError only as a backstop, since the parser
            # refuses nesting past data.MAX_NESTING before json.loads.
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
        spec = CJ.job_spec(
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
        return CJ.job_pb(rec)

    @rpc
    async def GetJob(self, request, context):
        return CJ.job_pb(self.jobs.get(request.job_id))

    @rpc
    async def ListJobs(self, request, context):
        bad = [s for s in request.statuses if s not in CJ.STATUS_NAME]
        if bad:
            raise RequestError(f"unknown status value {bad[0]}", "statuses")
        recs = self.jobs.list(tuple(CJ.STATUS_NAME[s] for s in request.statuses))[::-1]  # newest first
        items, token = C.page(recs, request.page_size, request.page_token, "ListJobs")
        return finetuning_pb2.ListJobsResponse(jobs=[CJ.job_pb(r) for r in items], next_page_token=token)

    @rpc
    async def CancelJob(self, request, context):
        rec = self.jobs.get(request.job_id)
        # documented: cancelling a finished job changes nothing
        if self.jobs.request_cancel(rec):
            self.app.ready_engine().call_soon(lambda: None)
        return CJ.job_pb(rec)

    @rpc
    async def ListJobEvents(self, request, context):
        self.jobs.get(request.job_id)
        items, token = C.page(
            self.jobs.events(request.job_id), request.page_size, request.page_token, "ListJobEvents"
        )
        return finetuning_pb2.ListJobEventsResponse(
            events=[CJ.event_pb(e) for e in items], next_page_token=token
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
                yield CJ.event_pb(ev)
            if rec.terminal and not self.jobs.events(rec.id, last):
                return
            if self.app.draining:  # end the stream before the server's stop cancels it; clients follow again
                raise RequestError(
                    f"the server is shutting down; follow again with after_event_id={last}",
                    "",
                    code="UNAVAILABLE",
                    reason="SERVER_DRAINING",
                    retry_after_s=1.0,
                )
            await asyncio.to_thread(self.jobs.wait_for_change, 0.5)

    @rpc
    async def ListCheckpoints(self, request, context):
        rec = self.jobs.get(request.job_id)
        d = self.jobs.job_dir(rec.id) / "checkpoints"
        # Checkpoint.metrics: the step event's (and an eval's) metrics at the checkpoint's step.
        at_step: dict[int, dict[str, float]] = {}
        for ev in self.jobs.events(rec.id):
            if ev["type"] in ("step", "eval"):
                at_step.setdefault(ev["step"], {}).update(CJ.event_metrics(ev))
        cps = []
        for p in sorted(d.glob("step-*")) if d.exists() else []:
            if p.name.endswith(".tmp"):
                continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            step = int(p.name.split("-")[1])
            cps.append(
                finetuning_pb2.Checkpoint(
                    name=p.name,
                    step=step,
                    size_bytes=size,
                    created_at=C.ts(p.stat().st_mtime),
                    metrics=at_step.get(step, {}),
                    adapter_id=checkpoint_id(rec.id, step) if rec.spec["method"] == "lora" else "",
                )
            )
        items, token = C.page(cps, request.page_size, request.page_token, "ListCheckpoints")
        return finetuning_pb2.ListCheckpointsResponse(checkpoints=items, next_page_token=token)


def _dataset_pb(info: dict) -> finetuning_pb2.Dataset:
    return finetuning_pb2.Dataset(
        name=info["name"],
        size_bytes=info["size_bytes"],
        num_records=info["num_records"],
        kind=info["kind"],
        created_at=C.ts(info["created_at"]),
        sha256=info["sha256"],
    )
