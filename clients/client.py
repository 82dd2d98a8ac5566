"""ZostreamClient: a typed, synchronous Python client for the zostream gRPC API.

Every call carries the API key as `authorization: Bearer KEY` metadata and a deadline (the call's
`timeout`, else the client's; Generate and StreamJobEvents only the call's, so a long generation is
never cut short). UNAVAILABLE (server down, restarting, overloaded listener) is retried with
exponential backoff: unary calls at any time, streams only before their first message, so a retry
never duplicates output. StreamJobEvents is the exception: it resumes after a drop from the last
event id it saw, which the API makes exact. Other failures raise a ZostreamError subclass per status
code (InvalidArgumentError, NotFoundError, ...) carrying the status details: reason, field
violations, retry advice (clients/errors.py).
Messages come back as dicts (proto field names, enums as names, 64-bit integers as ints),
generation output as the frozen dataclasses below.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zostream.clients.errors import (  # noqa: F401 - re-exported: the client's exceptions
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    ZostreamError,
    error,
    from_rpc_error,
)
from zostream.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    finetuning_pb2,
    finetuning_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)

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


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed Generate message: new tokens and text; the last also finish_reason, usage, seed."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str = ""  # "" until the last chunk, then e.g. "max_tokens", "eos_token", "stop_sequence"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int = 0
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # which completion, when n > 1


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob at its position and the most likely tokens there ((id, logprob), best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    """A whole generation (Generate with stream = false)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seed: int
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


def _logprobs(items: Iterable[generation_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(x.token_id, x.logprob, tuple((t.token_id, t.logprob) for t in x.top)) for x in items
    )


def to_dict(msg: Message) -> dict[str, Any]:
    """A message as a dict: proto field names, fields without presence always present, int64 as int."""
    return json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


_error = from_rpc_error


def _enum(enum: Any, prefix: str, value: str | int, what: str) -> int:
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


def _finish_reason(value: int) -> str:
    return (
        "" if value == 0 else generation_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
    )


def _check_engine_error(r: generation_pb2.GenerateResponse) -> None:
    if r.finish_reason == generation_pb2.FINISH_REASON_ERROR:
        raise error(r.error.code or "INTERNAL", r.error.message or "generation failed in the engine")


def _chunks(data: PathOrBytes) -> Iterator[bytes]:
    if isinstance(data, bytes):
        for i in range(0, len(data), CHUNK_BYTES):
            yield data[i : i + CHUNK_BYTES]
        return
    with open(data, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            yield block


def _chat(messages: list[dict[str, str]], continue_final_message: bool = False) -> generation_pb2.Chat:
    return generation_pb2.Chat(
        messages=[generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        continue_final_message=continue_final_message,
    )


def hyperparameters(steps: int, **kw: Any) -> finetuning_pb2.Hyperparameters:
    """Hyperparameters from keyword args named as its fields (None: the server's default).

    Enums take names ("cosine", "rademacher"); LoRA takes `lora` (a dict of LoraConfig fields) or
    the shortcuts lora_r / lora_alpha / lora_target_modules.
    """
    lora = dict(kw.pop("lora", None) or {})
    for short, name in (("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_target_modules", "target_modules")):
        if (v := kw.pop(short, None)) is not None:
            lora[name] = list(v) if name == "target_modules" else v
    fields = {k: v for k, v in kw.items() if v is not None}
    if "lr_schedule" in fields:
        fields["lr_schedule"] = _enum(
            finetuning_pb2.LrSchedule, "LR_SCHEDULE_", fields["lr_schedule"], "lr_schedule"
        )
    if "noise" in fields:
        fields["noise"] = _enum(finetuning_pb2.NoiseKind, "NOISE_KIND_", fields["noise"], "noise")
    known = set(finetuning_pb2.Hyperparameters.DESCRIPTOR.fields_by_name)
    if unknown := sorted(set(fields) - known):
        raise TypeError(f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    msg = finetuning_pb2.Hyperparameters(steps=steps, **fields)
    if lora:
        msg.lora.CopyFrom(common_pb2.LoraConfig(**{k: v for k, v in lora.items() if v is not None}))
    return msg


class ZostreamClient:
    """Synchronous client of one zostream server. Use as a context manager or call close()."""

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

    def __enter__(self) -> ZostreamClient:
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

    # ---- generation ----------------------------------------------------------------------------
    def _generate_request(
        self,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        token_ids: list[int] | None,
        stream: bool,
        *,
        max_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        stop_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        time_limit: float | None = None,
        adapter_id: str = "",
        request_id: str = "",
        continue_final_message: bool = False,
        include_stop_sequence: bool = False,
        logprobs: bool = False,
        top_logprobs: int = 0,
        prompt_logprobs: bool = False,
        n: int = 1,
    ) -> generation_pb2.GenerateRequest:
        if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or token_ids")
        sampling = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
        }
        req = generation_pb2.GenerateRequest(
            request_id=request_id,
            sampling=generation_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
            stopping=generation_pb2.StoppingCriteria(
                max_new_tokens=max_new_tokens,
                stop=list(stop),
                stop_token_ids=list(stop_token_ids),
                ignore_eos=ignore_eos,
                time_limit_seconds=time_limit or 0.0,
                include_stop_sequence=include_stop_sequence,
            ),
            adapter_id=adapter_id,
            stream=stream,
            logprobs=generation_pb2.LogprobsParams(
                tokens=logprobs, top_logprobs=top_logprobs, prompt=prompt_logprobs
            ),
            n=n,
        )
        if prompt is not None:
            req.text = prompt
        elif messages is not None:
            req.chat.CopyFrom(_chat(messages, continue_final_message))
        else:
            req.token_ids.ids.extend(token_ids or [])
        return req

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Iterator[GenerateChunk]:
        """Stream a generation: chunks of new tokens/text; the last has finish_reason, usage and seed.

        `params`: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop,
        stop_token_ids, ignore_eos, time_limit (s), adapter_id, request_id, continue_final_message,
        include_stop_sequence, logprobs / top_logprobs / prompt_logprobs. No deadline unless `timeout`
        is given: the client's default would cut a long generation short (bound it with time_limit,
        which ends it with a final message).
        Raises ZostreamError when the request fails inside the engine (finish_reason "error").
        """
        req = self._generate_request(prompt, messages, token_ids, True, **params)
        with closing(self._stream(self._gen.Generate, req, timeout, bounded=False)) as responses:
            for r in responses:
                _check_engine_error(r)
                yield GenerateChunk(
                    text=r.text,
                    token_ids=tuple(r.token_ids),
                    finish_reason=_finish_reason(r.finish_reason),
                    prompt_tokens=r.usage.prompt_tokens,
                    completion_tokens=r.usage.completion_tokens,
                    seed=r.seed,
                    request_id=r.request_id,
                    logprobs=_logprobs(r.logprobs),
                    prompt_logprobs=_logprobs(r.prompt_logprobs),
                    index=r.index,
                )

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> GenerateResult:
        """Generate a whole completion (one final message); same parameters as generate_stream."""
        req = self._generate_request(prompt, messages, token_ids, False, **params)
        text, ids, lps, plps, last = [], [], [], (), None
        with closing(self._stream(self._gen.Generate, req, timeout, bounded=False)) as responses:
            for r in responses:  # one message; several are tolerated (a server may stream anyway)
                _check_engine_error(r)
                text.append(r.text)
                ids.extend(r.token_ids)
                lps.extend(_logprobs(r.logprobs))
                plps = plps or _logprobs(r.prompt_logprobs)
                last = r
        if last is None or last.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED:
            raise error("INTERNAL", "the server ended the Generate stream without a final message")
        return GenerateResult(
            text="".join(text),
            token_ids=tuple(ids),
            finish_reason=_finish_reason(last.finish_reason),
            prompt_tokens=last.usage.prompt_tokens,
            completion_tokens=last.usage.completion_tokens,
            seed=last.seed,
            request_id=last.request_id,
            logprobs=tuple(lps),
            prompt_logprobs=plps,
        )

    def completions(self, prompt: str | None = None, *, n: int, **params: Any) -> list[GenerateResult]:
        """`n` completions of one prompt (completion i samples with seed + i), in index order."""
        parts: dict[int, list[GenerateChunk]] = {}
        for ch in self.generate_stream(prompt, n=n, **params):
            parts.setdefault(ch.index, []).append(ch)
        out = []
        for i in sorted(parts):
            chs, last = parts[i], parts[i][-1]
            out.append(
                GenerateResult(
                    text="".join(c.text for c in chs),
                    token_ids=tuple(t for c in chs for t in c.token_ids),
                    finish_reason=last.finish_reason,
                    prompt_tokens=last.prompt_tokens,
                    completion_tokens=last.completion_tokens,
                    seed=last.seed,
                    request_id=last.request_id,
                    logprobs=tuple(x for c in chs for x in c.logprobs),
                    prompt_logprobs=next((c.prompt_logprobs for c in chs if c.prompt_logprobs), ()),
                )
            )
        return out

    def abort(self, request_ids: Iterable[str]) -> list[str]:
        """Abort in-flight requests; returns the ids that were in flight."""
        r = self._unary(self._gen.Abort, generation_pb2.AbortRequest(request_ids=list(request_ids)))
        return list(r.aborted_request_ids)

    def tokenize(self, text: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """The prompt token ids Generate would see for `text` or a chat of `messages`."""
        if (text is None) == (messages is None):
            raise ValueError("give exactly one of text or messages")
        req = (
            generation_pb2.TokenizeRequest(text=text)
            if text is not None
            else generation_pb2.TokenizeRequest(chat=_chat(messages or []))
        )
        return list(self._unary(self._gen.Tokenize, req).token_ids)

    def model_info(self) -> dict[str, Any]:
        return to_dict(self._unary(self._gen.GetModelInfo, generation_pb2.GetModelInfoRequest()))

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
            yield from (finetuning_pb2.UploadDatasetRequest(chunk=c) for c in _chunks(path_or_bytes))

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
            method=_enum(common_pb2.TuningMethod, "TUNING_METHOD_", method, "method"),
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
        codes = [_enum(finetuning_pb2.JobStatus, "JOB_STATUS_", s, "statuses") for s in statuses]
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
                    raise _error(exc) from None
            finally:
                call.cancel()
            self._sleep(failures)
            failures += 1

    def list_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        req = finetuning_pb2.ListCheckpointsRequest(job_id=job_id)
        return list(self._pages(self._ft.ListCheckpoints, req, "checkpoints"))

    # ---- adapters ------------------------------------------------------------------------------
    def list_adapters(self) -> list[dict[str, Any]]:
        return list(self._pages(self._ad.ListAdapters, adapters_pb2.ListAdaptersRequest(), "adapters"))

    def get_adapter(self, adapter_id: str) -> dict[str, Any]:
        return to_dict(
            self._unary(self._ad.GetAdapter, adapters_pb2.GetAdapterRequest(adapter_id=adapter_id))
        )

    def delete_adapter(self, adapter_id: str) -> None:
        self._unary(self._ad.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id))

    def _export(
        self, adapter_id: str | None, job_id: str | None, timeout: float | None, upto: int | None = None
    ) -> Iterator[adapters_pb2.ExportUpdateLogResponse]:
        if (adapter_id is None) == (job_id is None):
            raise ValueError("give exactly one of adapter_id or job_id")
        req = (
            adapters_pb2.ExportUpdateLogRequest(adapter_id=adapter_id)
            if adapter_id is not None
            else adapters_pb2.ExportUpdateLogRequest(job_id=job_id)
        )
        if upto is not None:
            req.upto = upto
        return self._stream(self._ad.ExportUpdateLog, req, timeout)

    def export_update_log_to(
        self,
        path: str | os.PathLike[str],
        adapter_id: str | None = None,
        job_id: str | None = None,
        timeout: float | None = None,
        upto: int | None = None,
    ) -> int:
        """Download an adapter's or a job's update log to `path` (atomically); returns its size.
        upto: only its first `upto` steps."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        size, total = 0, 0
        try:
            with open(tmp, "wb") as f:
                for r in self._export(adapter_id, job_id, timeout, upto):
                    f.write(r.chunk)
                    size, total = size + len(r.chunk), r.total_bytes
            if size != total:
                raise ZostreamError("DATA_LOSS", f"received {size} bytes of a {total}-byte update log")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def export_update_log(
        self,
        adapter_id: str | None = None,
        job_id: str | None = None,
        timeout: float | None = None,
        upto: int | None = None,
    ) -> bytes:
        """An adapter's or a job's update log (upto: only its first `upto` steps), in memory."""
        parts, total = [], 0
        for r in self._export(adapter_id, job_id, timeout, upto):
            parts.append(r.chunk)
            total = r.total_bytes
        data = b"".join(parts)
        if len(data) != total:
            raise ZostreamError("DATA_LOSS", f"received {len(data)} bytes of a {total}-byte update log")
        return data

    def import_update_log(
        self,
        path_or_bytes: PathOrBytes,
        adapter_id: str = "",
        display_name: str = "",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Register an update log made elsewhere as an adapter; returns the Adapter."""
        meta = adapters_pb2.ImportUpdateLogMetadata(adapter_id=adapter_id, display_name=display_name)

        def requests() -> Iterator[adapters_pb2.ImportUpdateLogRequest]:
            yield adapters_pb2.ImportUpdateLogRequest(metadata=meta)
            yield from (adapters_pb2.ImportUpdateLogRequest(chunk=c) for c in _chunks(path_or_bytes))

        return to_dict(self._unary(self._ad.ImportUpdateLog, requests, timeout))

    # ---- health --------------------------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of `service` ("" = the whole server): "SERVING", "NOT_SERVING", ..."""
        r = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    # ---- weights as directories ------------------------------------------------------------------
    def download_weights(
        self,
        out_dir: str | os.PathLike[str],
        adapter_id: str | None = None,
        job_id: str | None = None,
        checkpoint: str = "",
        timeout: float | None = None,
        upto: int | None = None,
    ) -> list[str]:
        """Download an adapter's PEFT files, a job's checkpoint or a job's result into `out_dir`
        (created; files written whole or not at all); returns the relative paths written.
        upto (with job_id): the job's weights after its first `upto` steps, replayed by the server."""
        if (adapter_id is None) == (job_id is None):
            raise ValueError("give exactly one of adapter_id or job_id")
        req = adapters_pb2.DownloadWeightsRequest(checkpoint=checkpoint)
        if upto is not None:
            req.upto = upto
        if adapter_id is not None:
            req.adapter_id = adapter_id
        else:
            req.job_id = job_id or ""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        f, current, size, total, got = None, None, 0, 0, 0

        def close() -> None:
            if f is not None:
                f.close()
                if size != sizes[current]:
                    raise ZostreamError(
                        "DATA_LOSS", f"received {size} of {sizes[current]} bytes of {current}"
                    )
                os.replace(tmp, out / current)
                written.append(current)

        sizes: dict[str, int] = {}
        tmp = out / ".download.part"
        for r in self._stream(self._ad.DownloadWeights, req, timeout, bounded=False):
            if r.path != current:
                close()
                rel = Path(r.path)
                if rel.is_absolute() or ".." in rel.parts:
                    raise ZostreamError("DATA_LOSS", f"refusing a file outside the directory: {r.path!r}")
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                current, size, sizes[r.path] = r.path, 0, r.file_bytes
                f = open(tmp, "wb")  # noqa: SIM115 - closed by close()
            f.write(r.chunk)
            size += len(r.chunk)
            got += len(r.chunk)
            total = r.total_bytes
        close()
        if got != total:
            raise ZostreamError("DATA_LOSS", f"received {got} of {total} bytes")
        return written

    def import_peft(
        self,
        adapter_dir: str | os.PathLike[str],
        adapter_id: str = "",
        display_name: str = "",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Upload a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors) as an adapter."""
        d = Path(adapter_dir)
        meta = adapters_pb2.ImportPeftAdapterMetadata(adapter_id=adapter_id, display_name=display_name)

        def requests() -> Iterator[adapters_pb2.ImportPeftAdapterRequest]:
            yield adapters_pb2.ImportPeftAdapterRequest(metadata=meta)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                for c in _chunks(d / name):
                    yield adapters_pb2.ImportPeftAdapterRequest(
                        file=adapters_pb2.FileChunk(path=name, chunk=c)
                    )

        return to_dict(self._unary(self._ad.ImportPeftAdapter, requests, timeout))
