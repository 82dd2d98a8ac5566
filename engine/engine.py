"""Engine: owns the device; every `step()` is one pass over the layers.

One thread calls `step()` in a loop; other threads only `submit()` / `abort()`, which go
through a lock-protected inbox drained at the start of the next step. The server talks
only to this class (and imports grpc; this module does not).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

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
from .kv_cache import KVPlan, PagedKVCache, kv_bytes_per_token, plan_kv
from .models.attention import LoraSet
from .scheduler import PassPlan, Scheduler
from .store import WeightStore
from .streamer import LayerStreamer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepStats:
    """What one pass did; the metrics module turns it into Prometheus samples."""

    seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    finished: list[TokenEvent] = field(default_factory=list)
    first_token_latencies: list[float] = field(default_factory=list)
    queue_times: list[float] = field(default_factory=list)
    train_job: str | None = None
    train: dict[str, Any] | Exception | None = None  # the step's result, or why the job's step failed
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    transfer_seconds: float = 0.0
    stall_seconds: float = 0.0
    kv_bytes_written: int = 0  # new tokens' K/V stored into the paged cache
    kv_bytes_read: int = 0  # K/V the attention gathered through block tables
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_preemptions: int = 0  # sequences whose K/V were dropped for lack of blocks (they prefill again)
    kv_bytes_h2d: int = 0  # offloaded layers' K/V uploaded with their weights
    kv_bytes_d2h: int = 0  # their new rows written back to host memory
    adapter_loads: int = 0  # adapters copied host -> device for this pass
    adapter_evictions: int = 0  # device copies dropped for room (max_resident_adapters)
    adapters_resident: int = 0  # device-resident adapters after the pass


def resolve_device(name: str) -> torch.device:
    """The compute device; "emu" computes on the CPU (its emulated memory: emu_device(name))."""
    if name == "emu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device cuda was asked for but CUDA is not available; use --device cpu", "device")
    return dev


def emu_device(name: str) -> Any:
    """The process's emulated device for --device emu, else None."""
    if name != "emu":
        return None
    from .emu import shared_device

    return shared_device()


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


class Engine:
    def __init__(self, cfg: EngineConfig, tokenizer: Any | None = None) -> None:
        self.cfg = cfg
        self.store = WeightStore(cfg.model_dir)
        self.family, self.spec = self.store.family, self.store.spec
        self.device = resolve_device(cfg.device)
        self.dtype = self.store.dtype if cfg.compute_dtype == "auto" else _DTYPES[cfg.compute_dtype]
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model_dir)
        self.eos_ids = _eos_ids(self.tokenizer, self.store.raw_config)
        self.codec, self.codec_cache = _open_codec(self.store, cfg, self.device)
        lim = cfg.limits
        max_len = min(lim.max_seq_len, self.spec.max_positions)
        self.limits = lim if max_len == lim.max_seq_len else _replace(lim, max_seq_len=max_len)
        # The KV pool comes out of the device budget first (before "auto" measures free memory); the
        # weights' residency plan gets the rest.
        self.kv_plan, self.stream_cfg = _plan_kv(
            self.spec, self.dtype, self.limits, cfg.stream, self._streaming_floor_bytes(cfg.stream)
        )
        if not self.limits.kv_offload:
            self.cache = self._allocate_kv()
            self.streamer = self._base_streamer()
        else:  # which layers' KV lives in host memory depends on the weights' plan
            self.streamer = self._base_streamer(
                resident_extra_bytes=self.kv_plan.nbytes // self.spec.num_layers
            )
            self.cache = self._allocate_kv_offloaded()
        self.scheduler = Scheduler(
            self.limits, BlockAllocator(self.kv_plan.num_blocks, self.kv_plan.block_size)
        )
        self.seqs: dict[str, Sequence] = {}
        self.adapters = AdapterRegistry(self.device, lim.max_resident_adapters)  # id -> peft.LoraAdapter
        # Adapters built on first use (checkpoints.CheckpointSource: `<job_id>:ckpt-step-<N>`); the job
        # runner sets it. check(aid, field) raises RequestError; build(aid) runs on the engine thread.
        self.adapter_source: Any = None
        self.trainers: dict[str, Any] = {}  # job id -> trainer with .workload() / .commit()
        self._inbox: list[Callable[[], None]] = []
        self._admitting = 0  # submitted requests still in the inbox: they count against max_waiting
        self._queue_times: list[float] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def _streaming_floor_bytes(self, stream: Any) -> int:
        """Outer weights + streaming slots + one decoded block: what any plan keeps on the device."""
        st, n, item = self.store, self.store.num_layers, self.dtype.itemsize
        packed = self.codec_cache.block_nbytes if self.codec_cache is not None else st.block_nbytes
        decoded = max((sum(t.numel() for t in st.block(i).values()) * item for i in range(n)), default=0)
        outer = sum(t.numel() for t in st.outer().values()) * item
        return outer + stream.prefetch_depth * max((packed(i) for i in range(n)), default=0) + decoded

    def _allocate_kv(self, alloc: Callable[[int, int], torch.Tensor] | None = None) -> PagedKVCache:
        emu = emu_device(self.cfg.device)
        if alloc is None and emu is not None:
            alloc = lambda _i, n: emu.empty(n)  # noqa: E731 - the pools are emulated device memory, counted
        return PagedKVCache.allocate(
            self.spec.num_layers,
            self.kv_plan.num_blocks,
            self.kv_plan.block_size,
            getattr(self.spec, "kv_heads", self.spec.heads),
            self.spec.head_dim,
            self.dtype,
            self.device,
            alloc,
        )

    def _allocate_kv_offloaded(self) -> PagedKVCache:
        """Streamed layers' pools in host memory, the rest on the device, and the KVOffload between them.
        Without a copying device (the direct CPU path) there is nothing to offload to."""
        from .kv_offload import KVOffload

        s = self.streamer
        if not (s.copies and s.plan.streamed):
            return self._allocate_kv()
        streamed = set(s.plan.streamed)
        cache = self._allocate_kv(lambda i, n: s.dev.pinned(n) if i in streamed else s.dev.empty(n))
        cache.offload = KVOffload(cache, s.plan.streamed, s.dev, s.depth)
        s.kv_travel = cache.offload
        return cache

    def _base_streamer(self, resident_extra_bytes: int = 0) -> LayerStreamer:
        emu = emu_device(self.cfg.device)
        extra = dict(resident_extra_bytes=resident_extra_bytes)
        if self.codec_cache is None:
            return LayerStreamer(self.store, self.device, self.dtype, self.stream_cfg, emu=emu, **extra)
        from .codecs import decode_block

        cc = self.codec_cache
        return LayerStreamer(
            self.store,
            self.device,
            self.dtype,
            self.stream_cfg,
            source=cc.block,
            decoder=lambda packed, dev, dt: decode_block(self.codec, packed, dev, dt),
            emu=emu,
            **extra,
        )

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> StepStats:
        """Schedule, run one pass over the layers, commit the outputs."""
        t0 = time.monotonic()
        self._drain_inbox()
        plan = self.scheduler.schedule({r: len(s.tokens) for r, s in self.seqs.items()})
        for rid in plan.preempted:  # their K/V are gone: prefill prompt + output again when re-admitted
            self.seqs[rid].num_cached, self.seqs[rid].blocks = 0, []
        loads, evictions = self.adapters.loads, self.adapters.evictions
        workloads = self._workloads(plan)
        st = self.streamer.stats
        h2d, d2h, xfer, stall = st.h2d_bytes, st.d2h_bytes, st.transfer_seconds, st.stall_seconds
        error = None
        off = self.cache.offload
        kv_up, kv_down = (off.h2d_bytes, off.d2h_bytes) if off is not None else (0, 0)
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
        stats = self._commit(plan, workloads, error)
        if off is not None:
            stats.kv_bytes_h2d, stats.kv_bytes_d2h = off.h2d_bytes - kv_up, off.d2h_bytes - kv_down
        self.adapters.shrink()
        stats.queue_times, self._queue_times = self._queue_times, []
        stats.h2d_bytes, stats.d2h_bytes = st.h2d_bytes - h2d, st.d2h_bytes - d2h
        stats.transfer_seconds, stats.stall_seconds = st.transfer_seconds - xfer, st.stall_seconds - stall
        stats.kv_blocks_used, stats.kv_blocks_free = self.scheduler.kv.used, self.scheduler.kv.free
        stats.kv_preemptions = len(plan.preempted)
        stats.adapter_loads = self.adapters.loads - loads
        stats.adapter_evictions = self.adapters.evictions - evictions
        stats.adapters_resident = len(self.adapters.resident)
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
        for rid in list(self.seqs):
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
        with self._lock:
            self._admitting -= 1
        try:
            if req.request_id in self.seqs:  # a second sequence under one id would leak its KV slot
                raise RequestError(f"request {req.request_id!r} is already in flight", "request_id")
            if req.adapter_id and req.adapter_id not in self.adapters and ":" in req.adapter_id:
                self._build_adapter(req.adapter_id)
            if req.adapter_id and req.adapter_id not in self.adapters:  # deleted since submit()
                raise NotFoundError(
                    f"no adapter {req.adapter_id!r}; list them with ListAdapters", "adapter_id"
                )
            self.scheduler.add(req.request_id, len(req.prompt_ids), req.stopping.max_new_tokens)
        except RequestError as exc:
            _emit(
                req,
                TokenEvent(
                    req.request_id, (), "", FinishReason.ERROR, len(req.prompt_ids), 0, seed, str(exc)
                ),
            )
            return
        self.seqs[req.request_id] = new_sequence(req, -1, seed, self.tokenizer, self.device)

    def _build_adapter(self, adapter_id: str) -> None:
        """A checkpoint adapter on its first use: rebuilt here, on the engine thread (the pass waits for
        the replay: steps x LoRA tensors), then cached like any adapter (evicted by the registry's limits)."""
        if self.adapter_source is None:
            return
        try:
            adapter = self.adapter_source.build(adapter_id)
        except RequestError:
            raise
        except (OSError, ValueError) as exc:  # a damaged or unreadable log: this request fails, not the loop
            why = type(exc).__name__  # its message may name server paths
            raise RequestError(
                f"the checkpoint could not be rebuilt from its job's log ({why})", "adapter_id"
            ) from None
        self.adapters.cache(adapter_id, adapter, in_use=(s.req.adapter_id for s in self.seqs.values()))

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
        by_adapter: dict[str, list[int]] = {}
        for b, s in enumerate(seqs):
            if s.req.adapter_id:
                by_adapter.setdefault(s.req.adapter_id, []).append(b)
        if not by_adapter:
            return None
        lora: LoraSet = {}
        all_rows = len(seqs)
        for aid, rows in by_adapter.items():
            adapter = self.adapters.acquire(aid, pinned=by_adapter)
            if adapter is None:
                continue
            # Built on the host and sent asynchronously (once per layer): torch.tensor(..., device=cuda)
            # would synchronise the host inside the block loop.
            idx = None if len(rows) == all_rows else torch.tensor(rows).to(self.device, non_blocking=True)
            for module, lw in adapter.layer(layer, rows=idx).items():
                lora.setdefault(module, []).append(lw)
        return lora

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
            n_new = int(wl.lens.sum())
            stats.kv_bytes_written += n_new * self.kv_plan.bytes_per_token
            stats.kv_bytes_read += len(wl.seqs) * wl.attn.kv_len * self.kv_plan.bytes_per_token
            if kind == "prefill":
                stats.prefill_tokens += n_new
            else:
                stats.decode_tokens += n_new
            # A row with non-finite logits (a diverged adapter) would make sampling raise for the whole
            # batch: that row ends with an error and samples from zeros; its batch-mates go on.
            bad = (~torch.isfinite(wl.logits).all(dim=-1)).tolist()  # [B]
            if any(bad):
                wl.logits = torch.where(torch.tensor(bad, device=wl.logits.device)[:, None], 0.0, wl.logits)
            tokens = wl.sample()
            logprobs = wl.logprobs(tokens)
            for s, tok, nan, lp in zip(wl.seqs, tokens, bad, logprobs, strict=True):
                if s.finish is not None:
                    continue  # aborted during the pass
                if nan:
                    msg = "the model produced non-finite logits" + (
                        f" with adapter {s.req.adapter_id!r}" if s.req.adapter_id else ""
                    )
                    stats.finished.append(self._finish(s.req.request_id, FinishReason.ERROR, msg))
                    continue
                if s.first_token_time is None:
                    s.first_token_time = now
                    stats.first_token_latencies.append(now - s.req.arrival)
                s.output.append(tok)
                s.detok.add(tok)
                reason = s.check_stop(tok, self.eos_ids)
                delta = s.take_text(final=reason is not None)
                first = len(s.output) == 1
                _emit(
                    s.req,
                    TokenEvent(
                        s.req.request_id,
                        (tok,),
                        delta,
                        None,
                        len(s.req.prompt_ids),
                        len(s.output),
                        s.seed,
                        logprobs=(lp,) if lp is not None else (),
                        prompt_logprobs=(s.prompt_logprobs or ()) if first else (),
                    ),
                )
                if reason is not None:
                    stats.finished.append(self._finish(s.req.request_id, reason))
        return stats

    def _finish(self, request_id: str, reason: FinishReason, error: str = "") -> TokenEvent | None:
        s = self.seqs.pop(request_id, None)
        self.scheduler.finish(request_id)
        if s is None:
            return None
        s.finish = reason
        tail = s.take_text(final=True)  # text held back for a stop sequence that never came
        ev = TokenEvent(request_id, (), tail, reason, len(s.req.prompt_ids), len(s.output), s.seed, error)
        _emit(s.req, ev)
        return ev

    # ---- conveniences -------------------------------------------------------------------------
    def encode_prompt(
        self,
        text: str | None = None,
        messages: list[dict] | None = None,
        chat: bool = False,
        continue_final_message: bool = False,
    ) -> list[int]:
        tok = self.tokenizer
        if messages is not None or chat:
            msgs = messages if messages is not None else [{"role": "user", "content": text or ""}]
            if not getattr(tok, "chat_template", None):
                raise PreconditionError("this model has no chat template; send a plain prompt", "messages")
            if continue_final_message and msgs[-1].get("role") != "assistant":
                raise RequestError(
                    "continue_final_message continues an assistant turn: make the last message's role "
                    "assistant, or set continue_final_message false",
                    "continue_final_message",
                )
            rendered = tok.apply_chat_template(
                msgs,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
                tokenize=False,
            )
            return list(tok(rendered, add_special_tokens=False)["input_ids"])
        return list(tok(text or "")["input_ids"])

    def generate(self, requests: Iterable[GenerateRequest]) -> dict[str, TokenEvent]:
        """Run requests to completion in this thread; returns the final event per request id."""
        finals: dict[str, TokenEvent] = {}
        texts: dict[str, list[str]] = {}
        tokens: dict[str, list[int]] = {}
        lps: dict[str, list[Any]] = {}
        plps: dict[str, tuple[Any, ...]] = {}
        for req in requests:
            user_cb = req.callback

            def cb(ev: TokenEvent, user_cb=user_cb) -> None:
                texts.setdefault(ev.request_id, []).append(ev.text)
                tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
                lps.setdefault(ev.request_id, []).extend(ev.logprobs)
                if ev.prompt_logprobs:
                    plps[ev.request_id] = ev.prompt_logprobs
                if ev.finish_reason is not None:
                    finals[ev.request_id] = ev
                if user_cb:
                    user_cb(ev)

            req.callback = cb
            self.submit(req)
            finals.pop(req.request_id, None)
            texts[req.request_id] = []
        from .loop import EngineLoop

        EngineLoop(self).run_until(lambda: len(finals) >= len(texts))
        return {
            rid: TokenEvent(
                rid,
                tuple(tokens.get(rid, ())),
                "".join(texts[rid]),
                ev.finish_reason,
                ev.prompt_tokens,
                ev.completion_tokens,
                ev.seed,
                ev.error,
                tuple(lps.get(rid, ())),
                plps.get(rid, ()),
            )
            for rid, ev in finals.items()
        }


def _is_train(wls: list[Workload]) -> bool:
    from .trainer import ZOStepWorkload

    return any(isinstance(w, ZOStepWorkload) for w in wls)


def _emit(req: GenerateRequest, ev: TokenEvent) -> None:
    if req.callback is not None:
        req.callback(ev)


def _eos_ids(tokenizer: Any, raw_config: dict) -> set[int]:
    ids: set[int] = set()
    for src in (raw_config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(int(x) for x in src)
    return ids


def _replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _plan_kv(spec: Any, dtype: torch.dtype, lim: Any, stream: Any, fixed: int = 0) -> tuple[KVPlan, Any]:
    """The KV pool's plan, and the stream config whose budget is what the pool leaves for weights.
    fixed: device bytes the weights need whatever the plan (outer weights and streaming slots)."""
    kv_heads = getattr(spec, "kv_heads", spec.heads)
    per_token = kv_bytes_per_token(spec.num_layers, kv_heads, spec.head_dim, dtype.itemsize)
    budget = stream.gpu_memory_bytes
    share = stream.prefetch_depth / spec.num_layers if lim.kv_offload else 1.0
    plan = plan_kv(
        per_token,
        lim.kv_block_size,
        lim.max_batch,
        lim.max_seq_len,
        lim.kv_memory_bytes,
        budget,
        share,
        fixed,
    )
    if budget:  # None: "auto" measures free memory after the pool exists; 0: every block streams anyway
        # Offloaded: the device holds a staging pool per streaming slot (resident layers' pools are
        # charged to their blocks by the streamer's plan); otherwise every layer's pool.
        layer = plan.nbytes // spec.num_layers
        device_kv = stream.prefetch_depth * layer if lim.kv_offload else plan.nbytes
        stream = _replace(stream, gpu_memory_bytes=max(0, budget - device_kv))
    return plan, stream


def _open_codec(store: WeightStore, cfg: EngineConfig, device: torch.device):
    if cfg.codec.name == "none":
        return None, None
    from .codecs import get_codec, open_codec_cache

    codec = get_codec(cfg.codec)
    return codec, open_codec_cache(store, cfg.codec, device=device if device.type == "cuda" else None)
