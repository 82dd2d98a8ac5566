"""Engine: owns the device; every `step()` is one pass over the layers.

One thread calls `step()` in a loop; other threads only `submit()` / `abort()`, which go
through a lock-protected inbox drained at the start of the next step. The server talks
only to this class (and imports grpc; this module does not).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import engine_setup as setup
from .adapters import AdapterRegistry
from .config import EngineConfig
from .errors import NotFoundError, PreconditionError, RequestError, ResourceExhaustedError
from .forward import Workload, run_pass
from .generation import (
    FinishReason,
    GenerateRequest,
    GenerationWorkload,
    Sequence,
    TokenEvent,
    new_sequence,
)
from .kv_blocks import BlockAllocator
from .models.attention import LoraSet
from .offline import run_to_completion
from .prompts import encode_prompt
from .scheduler import PassPlan, Scheduler
from .step_commit import Moved, StepStats, commit_generation, emit
from .store import WeightStore
from .streamer import LayerStreamer


class Engine:
    def __init__(self, cfg: EngineConfig, tokenizer: Any | None = None) -> None:
        self.cfg = cfg
        self.store = WeightStore(cfg.model_dir)
        self.family, self.spec = self.store.family, self.store.spec
        self.device = setup.resolve_device(cfg.device)
        self.dtype = setup.compute_dtype(
            cfg.compute_dtype,
            self.store.dtype,
            cfg.device,
            self.store.num_parameters(),
            cfg.stream.host_memory_bytes,
        )
        self.tokenizer = tokenizer if tokenizer is not None else setup.load_tokenizer(cfg.model_dir)
        self.eos_ids = setup.eos_ids(self.tokenizer, self.store.raw_config)
        self.codec, self.codec_cache = setup.open_codec(self.store, cfg, self.device)
        lim = cfg.limits
        max_len = min(lim.max_seq_len, self.spec.max_positions)
        self.limits = lim if max_len == lim.max_seq_len else dataclasses.replace(lim, max_seq_len=max_len)
        # The KV pool comes out of the device budget first (before "auto" measures free memory); the
        # weights' residency plan gets the rest.
        floor = setup.streaming_floor_bytes(self.store, self.codec_cache, self.dtype, cfg.stream)
        self.kv_plan, self.stream_cfg = setup.plan_kv_and_stream(
            self.spec, self.dtype, self.limits, cfg.stream, floor
        )
        emu = setup.emu_device(cfg.device)
        weights = (self.store, self.device, self.dtype, self.stream_cfg, emu, self.codec, self.codec_cache)
        if not self.limits.kv_offload:
            self.cache = setup.allocate_kv(self.spec, self.kv_plan, self.dtype, self.device, emu)
            self.streamer = setup.base_streamer(*weights)
        else:  # which layers' KV lives in host memory depends on the weights' plan
            self.streamer = setup.base_streamer(
                *weights, resident_extra_bytes=self.kv_plan.nbytes // self.spec.num_layers
            )
            self.cache = setup.allocate_kv_offloaded(
                self.spec, self.kv_plan, self.dtype, self.device, emu, self.streamer
            )
        self.scheduler = Scheduler(
            self.limits, BlockAllocator(self.kv_plan.num_blocks, self.kv_plan.block_size)
        )
        self.seqs: dict[str, Sequence] = {}
        self.adapters = AdapterRegistry(self.device, lim.max_resident_adapters)  # id -> peft.LoraAdapter
        # Adapters built on first use (checkpoints.CheckpointSource: `<job_id>:ckpt-step-<N>`); the job
        # runner sets it. check(aid, field) raises RequestError; build(aid) runs on a worker thread.
        self.adapter_source: Any = None
        # Checkpoint id -> the requests (and seeds) waiting for its build; engine thread only.
        self._parked: dict[str, list[tuple[GenerateRequest, int]]] = {}
        self.trainers: dict[str, Any] = {}  # job id -> trainer with .workload() / .commit()
        self._inbox: list[Callable[[], None]] = []
        self._admitting = 0  # submitted requests still in the inbox: they count against max_waiting
        self._queue_times: list[float] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> StepStats:
        """Schedule, run one pass over the layers, commit the outputs."""
        t0 = time.monotonic()
        self._drain_inbox()
        plan = self.scheduler.schedule({r: len(s.tokens) for r, s in self.seqs.items()})
        for rid in plan.preempted:  # their K/V are gone: prefill prompt + output again when re-admitted
            self.seqs[rid].num_cached, self.seqs[rid].blocks = 0, []
        adapters_before = self.adapters.loads, self.adapters.evictions
        workloads = self._workloads(plan)  # makes the pass's adapters resident
        moved_before = Moved.now(self.streamer.stats, self.cache.offload)
        workloads, error = self._run(plan, workloads)
        stats = self._commit(plan, workloads, error)
        self.adapters.shrink()
        self._count(stats, plan, adapters_before, moved_before)
        stats.seconds = time.monotonic() - t0
        return stats

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self.seqs or self.scheduler.waiting or self.scheduler.jobs)

    def wait_for_work(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    # ---- requests (any thread) ---------------------------------------------------------------
    def submit(self, req: GenerateRequest) -> int:
        """Validate and enqueue; returns the seed the request will use. Raises RequestError."""
        if req.adapter_id:
            self.check_adapter(req.adapter_id)
        if any(not 0 <= t < self.spec.vocab for t in req.prompt_ids):
            raise RequestError(f"token ids must be in [0, {self.spec.vocab})", "prompt_token_ids")
        self.scheduler.check_fits(len(req.prompt_ids), req.stopping.max_new_tokens)
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(63)
        with self._lock:
            # Refused here, on the caller's thread, so overload is a RESOURCE_EXHAUSTED status and never
            # a request that is accepted and then fails. Only the engine thread shrinks this sum.
            queued = len(self.scheduler.waiting) + self._admitting
            if queued >= self.limits.max_waiting:
                raise ResourceExhaustedError(
                    f"{queued} requests are already waiting; retry later", "request", reason="QUEUE_FULL"
                )
            self._admitting += 1
            self._inbox.append(lambda: self._admit(req, seed))
        self._wake.set()
        return seed

    def abort(self, request_id: str) -> None:
        self._post(lambda: self._finish(request_id, FinishReason.CANCELLED))

    def abort_all(self) -> None:
        """Engine thread: cancel every request in flight, and those waiting for a checkpoint's build."""
        for rid in [*self.seqs, *(r.request_id for w in self._parked.values() for r, _ in w)]:
            self.abort(rid)

    # ---- registries (engine thread only) ------------------------------------------------------
    def add_job(self, job_id: str, trainer: Any) -> None:
        """Schedule a training job: its trainer's step joins the passes (trainer.workload / commit)."""
        self.trainers[job_id] = trainer
        self.scheduler.add_job(job_id)

    def remove_job(self, job_id: str) -> None:
        self.trainers.pop(job_id, None)
        self.scheduler.remove_job(job_id)

    def check_adapter(self, adapter_id: str, field: str = "adapter_id") -> None:
        """NotFoundError naming `field` unless adapter_id is served or can be built (a checkpoint id)."""
        if adapter_id in self.adapters:
            return
        if self.adapter_source is not None and ":" in adapter_id:
            self.adapter_source.check(adapter_id, field)
            return
        raise NotFoundError(f"no adapter {adapter_id[:128]!r}; list them with ListAdapters", field)

    def put_adapter(self, adapter_id: str, adapter: Any) -> None:
        """Serve `adapter` (a peft.LoraAdapter) as adapter_id, replacing what was served under it."""
        self.adapters[adapter_id] = adapter

    def adapter_in_use(self, adapter_id: str) -> bool:
        return any(s.req.adapter_id == adapter_id for s in self.seqs.values())

    def drop_adapter(self, adapter_id: str, field: str = "adapter_id") -> None:
        """Stop serving adapter_id; refused while a request generates with it."""
        if self.adapter_in_use(adapter_id):
            raise PreconditionError("a request is generating with this adapter; retry when it is done", field)
        self.adapters.pop(adapter_id, None)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the engine thread before the next pass (jobs, adapters)."""
        self._post(fn)

    def _post(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._inbox.append(fn)
        self._wake.set()

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for fn in inbox:
            fn()

    def _admit(self, req: GenerateRequest, seed: int) -> None:
        aid = req.adapter_id
        if aid and aid not in self.adapters and ":" in aid and self.adapter_source is not None:
            self._park(req, seed)  # still counted in _admitting: it waits as a queued request does
            return
        with self._lock:
            self._admitting -= 1
        try:
            if req.request_id in self.seqs:  # a second sequence under one id would leak its KV slot
                raise RequestError(f"request {req.request_id!r} is already in flight", "request_id")
            if req.adapter_id and req.adapter_id not in self.adapters:  # deleted since submit()
                raise NotFoundError(
                    f"no adapter {req.adapter_id!r}; list them with ListAdapters", "adapter_id"
                )
            self.scheduler.add(req.request_id, len(req.prompt_ids), req.stopping.max_new_tokens)
        except RequestError as exc:
            _end_unstarted(req, seed, FinishReason.ERROR, str(exc))
            return
        self.seqs[req.request_id] = new_sequence(req, -1, seed, self.tokenizer, self.device)

    def _park(self, req: GenerateRequest, seed: int) -> None:
        """A checkpoint adapter on its first use: rebuilt from its job's log on a worker thread (replay:
        steps x LoRA tensors) while the passes go on; the requests that asked for it wait, then are
        admitted (or fail) once it is built."""
        waiting = self._parked.setdefault(req.adapter_id, [])
        waiting.append((req, seed))
        if len(waiting) == 1:
            threading.Thread(
                target=self._build_adapter, args=(req.adapter_id,), name="zostream-checkpoint", daemon=True
            ).start()

    def _build_adapter(self, adapter_id: str) -> None:
        """Worker thread: build, then hand the result to the engine thread."""
        adapter, error = None, None
        try:
            adapter = self.adapter_source.build(adapter_id)
        except RequestError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a damaged or unreadable log fails its requests, not the loop
            why = type(exc).__name__  # its message may name server paths
            error = RequestError(
                f"the checkpoint could not be rebuilt from its job's log ({why})", "adapter_id"
            )
        self._post(lambda: self._built(adapter_id, adapter, error))

    def _built(self, adapter_id: str, adapter: Any, error: RequestError | None) -> None:
        """Engine thread: cache the built adapter (evicted by the registry's limits) and admit its
        requests, or fail them with the build's error."""
        waiting = self._parked.pop(adapter_id, [])
        if adapter is not None:
            self.adapters.cache(adapter_id, adapter, in_use=(s.req.adapter_id for s in self.seqs.values()))
        for req, seed in waiting:
            if error is None:
                self._admit(req, seed)
            else:
                self._unpark(req, seed, FinishReason.ERROR, str(error))

    def _unpark(self, req: GenerateRequest, seed: int, reason: FinishReason, error: str) -> TokenEvent:
        """End a parked request (its build failed, or it was cancelled): it leaves the queued count."""
        with self._lock:
            self._admitting -= 1
        return _end_unstarted(req, seed, reason, error)

    # ---- one pass -----------------------------------------------------------------------------
    def _workloads(self, plan: PassPlan) -> list[tuple[str, Workload]]:
        out: list[tuple[str, Workload]] = []
        # The pass's adapters on the device first (LRU eviction of the others, counted).
        self.adapters.prepare(
            self.seqs[r].req.adapter_id for r in (*plan.prefill, *plan.decode) if r in self.seqs
        )
        for ids, kind in ((plan.prefill, "prefill"), (plan.decode, "decode")):
            seqs = [self.seqs[r] for r in ids if r in self.seqs]
            for s in seqs:
                s.slot = self.scheduler.slot_of(s.req.request_id)
                s.blocks = self.scheduler.kv.ensure(s.req.request_id, len(s.tokens))
                if kind == "prefill" and not s.output:  # a preempted sequence was admitted before
                    self._queue_times.append(time.monotonic() - s.req.arrival)
            if seqs:
                wl = GenerationWorkload(self.family, self.spec, seqs, self.cache, self.device, self._lora_for)
                out.append((kind, wl))
        if plan.train_job and plan.train_job in self.trainers:
            out.append(("train", self.trainers[plan.train_job].workload()))
        return out

    def _run(
        self, plan: PassPlan, workloads: list[tuple[str, Workload]]
    ) -> tuple[list[tuple[str, Workload]], Exception | None]:
        """One pass per streamer; returns the workloads to commit, and why the job's pass failed (or None)."""
        error = None
        off = self.cache.offload
        views = [w.attn.paged for k, w in workloads if k != "train"]
        if off is not None and views:
            off.arm(views)  # streamed layers' KV blocks for this pass ride with their weights
        try:
            for streamer, wls in self._by_streamer(plan, workloads):
                try:
                    run_pass(streamer, wls)
                except Exception as exc:  # a job's pass failing must not take generation down
                    if not _is_train(wls):
                        raise
                    # Generation in the same pass committed nothing: it simply runs again next pass.
                    workloads = [(k, w) for k, w in workloads if k == "train"]
                    error = exc
        finally:
            if off is not None:
                off.disarm()
        return workloads, error

    def _by_streamer(self, plan: PassPlan, workloads: list[tuple[str, Workload]]):
        """Generation and LoRA jobs read the base streamer; a full-parameter job its own copy."""
        groups: list[tuple[LayerStreamer, list[Workload]]] = []
        for kind, wl in workloads:
            streamer = self.trainers[plan.train_job].streamer if kind == "train" else self.streamer
            for s, wls in groups:
                if s is streamer:
                    wls.append(wl)
                    break
            else:
                groups.append((streamer, [wl]))
        return groups

    def _lora_for(self, seqs: list[Sequence], layer: int) -> LoraSet | None:
        return self.adapters.lora_set([s.req.adapter_id for s in seqs], layer)

    def _commit(
        self, plan: PassPlan, workloads: list[tuple[str, Workload]], error: Exception | None = None
    ) -> StepStats:
        stats = StepStats(train_job=plan.train_job)
        now = time.monotonic()
        for kind, wl in workloads:
            if kind == "train":
                try:
                    if error is not None:
                        raise error
                    stats.train = self.trainers[plan.train_job].commit(wl)
                except Exception as exc:  # disk full, divergence...: the job fails, the engine serves on
                    stats.train = exc
                continue
            assert isinstance(wl, GenerationWorkload)
            commit_generation(kind, wl, stats, now, self.eos_ids, self.kv_plan.bytes_per_token, self._finish)
        return stats

    def _count(
        self, stats: StepStats, plan: PassPlan, adapters_before: tuple[int, int], moved_before: Moved
    ) -> None:
        """What the pass moved and queued, and the KV pool and adapters after it."""
        Moved.now(self.streamer.stats, self.cache.offload).count_into(stats, moved_before)
        stats.queue_times, self._queue_times = self._queue_times, []
        stats.kv_blocks_used, stats.kv_blocks_free = self.scheduler.kv.used, self.scheduler.kv.free
        stats.kv_preemptions = len(plan.preempted)
        stats.adapter_loads = self.adapters.loads - adapters_before[0]
        stats.adapter_evictions = self.adapters.evictions - adapters_before[1]
        stats.adapters_resident = len(self.adapters.resident)

    def _finish(self, request_id: str, reason: FinishReason, error: str = "") -> TokenEvent | None:
        for waiting in self._parked.values():  # cancelled while its checkpoint was being built
            for k, (req, seed) in enumerate(waiting):
                if req.request_id == request_id:
                    del waiting[k]
                    return self._unpark(req, seed, reason, error)
        s = self.seqs.pop(request_id, None)
        self.scheduler.finish(request_id)
        if s is None:
            return None
        s.finish = reason
        tail = s.take_text(final=True)  # text held back for a stop sequence that never came
        ev = TokenEvent(request_id, (), tail, reason, len(s.req.prompt_ids), len(s.output), s.seed, error)
        emit(s.req, ev)
        return ev

    # ---- conveniences -------------------------------------------------------------------------
    def encode_prompt(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        chat: bool = False,
        continue_final_message: bool = False,
    ) -> list[int]:
        return encode_prompt(self.tokenizer, text, messages, chat, continue_final_message)

    def generate(self, requests: Iterable[GenerateRequest]) -> dict[str, TokenEvent]:
        """Run requests to completion in this thread; returns the final event per request id."""
        return run_to_completion(self, requests)


def _is_train(wls: list[Workload]) -> bool:
    from .trainer import ZOStepWorkload

    return any(isinstance(w, ZOStepWorkload) for w in wls)


def _end_unstarted(req: GenerateRequest, seed: int, reason: FinishReason, error: str) -> TokenEvent:
    """The final event of a request that never generated (refused at admission, or ended while parked)."""
    ev = TokenEvent(req.request_id, (), "", reason, len(req.prompt_ids), 0, seed, error)
    emit(req, ev)
    return ev
