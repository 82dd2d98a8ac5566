"""The client's FineTuning calls: datasets (upload, list, get, delete) and jobs (create, list, cancel,
events, checkpoints)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from zostream.clients.client_base import ClientBase, PathOrBytes, enum_number, file_chunks, to_dict
from zostream.clients.errors import from_rpc_error
from zostream.v1 import common_pb2, finetuning_pb2


def hyperparameters(steps: int, **kw: Any) -> finetuning_pb2.Hyperparameters:
    """Hyperparameters from keyword args named as its fields (None: the server's default).

    Enums take names ("cosine", "rademacher"); LoRA takes `lora` (a dict of LoraConfig fields) or
    the shortcuts lora_r / lora_alpha / lora_target_modules / lora_init_scale.
    """
    lora = dict(kw.pop("lora", None) or {})
    shortcuts = ("r", "alpha", "target_modules", "init_scale")
    for short, name in ((f"lora_{n}", n) for n in shortcuts):
        if (v := kw.pop(short, None)) is not None:
            lora[name] = list(v) if name == "target_modules" else v
    fields = {k: v for k, v in kw.items() if v is not None}
    if "lr_schedule" in fields:
        fields["lr_schedule"] = enum_number(
            finetuning_pb2.LrSchedule, "LR_SCHEDULE_", fields["lr_schedule"], "lr_schedule"
        )
    if "noise" in fields:
        fields["noise"] = enum_number(finetuning_pb2.NoiseKind, "NOISE_KIND_", fields["noise"], "noise")
    known = set(finetuning_pb2.Hyperparameters.DESCRIPTOR.fields_by_name)
    if unknown := sorted(set(fields) - known):
        raise TypeError(f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    msg = finetuning_pb2.Hyperparameters(steps=steps, **fields)
    if lora:
        msg.lora.CopyFrom(common_pb2.LoraConfig(**{k: v for k, v in lora.items() if v is not None}))
    return msg


class JobCalls(ClientBase):
    """FineTuning: datasets and jobs."""

    # ---- datasets and jobs ---------------------------------------------------------------------
    def upload_dataset(
        self,
        name: str,
        path_or_bytes: PathOrBytes,
        kind: str | None = None,
        overwrite: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Upload a JSONL dataset in 1 MiB chunks (metadata first); returns the stored Dataset."""
        meta = finetuning_pb2.DatasetMetadata(name=name, kind=kind or "", overwrite=overwrite)

        def requests() -> Iterator[finetuning_pb2.UploadDatasetRequest]:
            yield finetuning_pb2.UploadDatasetRequest(metadata=meta)
            yield from (finetuning_pb2.UploadDatasetRequest(chunk=c) for c in file_chunks(path_or_bytes))

        return to_dict(self._unary(self._ft.UploadDataset, requests, timeout))

    def list_datasets(self) -> list[dict[str, Any]]:
        return list(self._pages(self._ft.ListDatasets, finetuning_pb2.ListDatasetsRequest(), "datasets"))

    def get_dataset(self, name: str) -> dict[str, Any]:
        return to_dict(self._unary(self._ft.GetDataset, finetuning_pb2.GetDatasetRequest(name=name)))

    def delete_dataset(self, name: str) -> None:
        self._unary(self._ft.DeleteDataset, finetuning_pb2.DeleteDatasetRequest(name=name))

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job: record, events, update log, checkpoints, result and its adapter."""
        self._unary(self._ft.DeleteJob, finetuning_pb2.DeleteJobRequest(job_id=job_id))

    def create_job(
        self,
        method: str,
        training_dataset: str,
        *,
        validation_dataset: str = "",
        steps: int,
        idempotency_key: str = "",
        display_name: str = "",
        **hyperparams: Any,
    ) -> dict[str, Any]:
        """Create a job ("lora" or "full"); `hyperparams` as in `hyperparameters()`.

        Without an idempotency_key a random one is sent, so that a retry after UNAVAILABLE can never
        create the job twice.
        """
        req = finetuning_pb2.CreateJobRequest(
            display_name=display_name,
            method=enum_number(common_pb2.TuningMethod, "TUNING_METHOD_", method, "method"),
            hyperparameters=hyperparameters(steps, **hyperparams),
            training_dataset=training_dataset,
            validation_dataset=validation_dataset,
            idempotency_key=idempotency_key or f"client-{uuid.uuid4().hex}",
        )
        return to_dict(self._unary(self._ft.CreateJob, req))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return to_dict(self._unary(self._ft.GetJob, finetuning_pb2.GetJobRequest(job_id=job_id)))

    def list_jobs(self, page_size: int = 50, statuses: Iterable[str | int] = ()) -> Iterator[dict[str, Any]]:
        """Jobs, newest first, following page tokens; `statuses` filter by name ("running") or number."""
        codes = [enum_number(finetuning_pb2.JobStatus, "JOB_STATUS_", s, "statuses") for s in statuses]
        req = finetuning_pb2.ListJobsRequest(page_size=page_size, statuses=codes)
        return self._pages(self._ft.ListJobs, req, "jobs")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return to_dict(self._unary(self._ft.CancelJob, finetuning_pb2.CancelJobRequest(job_id=job_id)))

    def job_events(self, job_id: str, after_event_id: int = 0) -> Iterator[dict[str, Any]]:
        """The events recorded so far with id > after_event_id, oldest first (paged list)."""
        req = finetuning_pb2.ListJobEventsRequest(job_id=job_id)
        return (e for e in self._pages(self._ft.ListJobEvents, req, "events") if e["id"] > after_event_id)

    def stream_job_events(
        self, job_id: str, after_event_id: int = 0, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Follow a job's events until its final one; reconnects on UNAVAILABLE from the last id seen.

        No deadline unless `timeout` is given (a job may run for days). Gives up after `retries`
        consecutive failed reconnects.
        """
        last, failures = after_event_id, 0
        while True:
            req = finetuning_pb2.StreamJobEventsRequest(job_id=job_id, after_event_id=last)
            call = self._ft.StreamJobEvents(req, metadata=self._metadata, timeout=timeout)
            try:
                for event in call:
                    last, failures = event.id, 0
                    yield to_dict(event)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()
            self._sleep(failures)
            failures += 1

    def list_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        req = finetuning_pb2.ListCheckpointsRequest(job_id=job_id)
        return list(self._pages(self._ft.ListCheckpoints, req, "checkpoints"))
