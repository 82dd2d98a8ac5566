"""Decides what the next pass over the layers carries. Imports no torch.

Generation: continuous batching. Waiting requests are admitted, in arrival order, while a
batch row is free, the paged KV cache can reserve their prompt + max_new_tokens, and the pass's
prefill-token budget lasts; running requests decode one token a pass. A request waits (it is
not refused) while blocks are held by others; one that could never fit is refused up front.
Fine-tuning: one ZO step rides along every pass, except that a pass right after a
training pass skips training when requests wait for their first token, so time to
first token stays bounded by one training pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import LimitsConfig
from .errors import RequestError, ResourceExhaustedError
from .kv_blocks import BlockAllocator, blocks_for


@dataclass(frozen=True)
class PassPlan:
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    train_job: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.train_job)


@dataclass
class Scheduler:
    limits: LimitsConfig
    kv: BlockAllocator | None = None  # None: max_batch full sequences
    waiting: deque[str] = field(default_factory=deque)
    running: dict[str, int] = field(default_factory=dict)  # request id -> KV slot
    lengths: dict[str, int] = field(default_factory=dict)  # request id -> tokens to prefill
    totals: dict[str, int] = field(default_factory=dict)  # request id -> prompt + max_new_tokens
    jobs: deque[str] = field(default_factory=deque)  # trainable job ids, round-robin
    last_pass_trained: bool = False

    def __post_init__(self) -> None:
        self.free_slots = list(range(self.limits.max_batch - 1, -1, -1))
        if self.kv is None:
            bs = self.limits.kv_block_size
            self.kv = BlockAllocator(self.limits.max_batch * blocks_for(self.limits.max_seq_len, bs), bs)

    # ---- generation ---------------------------------------------------------------------------
    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse up front what can never run, so nothing waits forever."""
        lim = self.limits
        if prompt_len < 1:
            raise RequestError("the prompt is empty; send text, token ids or messages", field="prompt")
        if prompt_len > lim.max_prefill_tokens:
            raise RequestError(
                f"prompt has {prompt_len} tokens; this server prefills at most {lim.max_prefill_tokens}",
                field="prompt",
            )
        if max_new_tokens > lim.max_new_tokens:
            raise RequestError(f"at most {lim.max_new_tokens} on this server", field="max_new_tokens")
        if prompt_len + max_new_tokens > lim.max_seq_len:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"maximum sequence length {lim.max_seq_len}; shorten the prompt or lower max_new_tokens",
                field="max_new_tokens",
            )
        kv = self.kv
        need = kv.blocks_for(prompt_len + max_new_tokens)
        if need > kv.num_blocks:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) needs {need} KV blocks; "
                f"this server's KV cache holds {kv.num_blocks} ({kv.num_blocks * kv.block_size} tokens); "
                "shorten the prompt or lower max_new_tokens",
                field="max_new_tokens",
            )

    def add(self, request_id: str, prompt_len: int, max_new_tokens: int) -> None:
        self.check_fits(prompt_len, max_new_tokens)
        if len(self.waiting) >= self.limits.max_waiting:
            raise ResourceExhaustedError(
                f"{len(self.waiting)} requests are already waiting; retry later",
                field="request",
                reason="QUEUE_FULL",
            )
        self.waiting.append(request_id)
        self.lengths[request_id] = prompt_len
        self.totals[request_id] = prompt_len + max_new_tokens

    def slot_of(self, request_id: str) -> int:
        return self.running[request_id]

    def finish(self, request_id: str) -> None:
        if request_id in self.running:
            self.free_slots.append(self.running.pop(request_id))
            self.kv.release(request_id)
        elif request_id in self.waiting:
            self.waiting.remove(request_id)
        self.lengths.pop(request_id, None)
        self.totals.pop(request_id, None)

    # ---- jobs -------------------------------------------------------------------------------
    def add_job(self, job_id: str) -> None:
        if job_id not in self.jobs:
            self.jobs.append(job_id)

    def remove_job(self, job_id: str) -> None:
        if job_id in self.jobs:
            self.jobs.remove(job_id)

    # ---- the plan ---------------------------------------------------------------------------
    def schedule(self) -> PassPlan:
        decode = tuple(self.running)
        prefill: list[str] = []
        budget = self.limits.max_prefill_tokens
        while (
            self.waiting
            and self.free_slots
            and self.lengths[self.waiting[0]] <= budget
            and self.kv.can_reserve(self.totals[self.waiting[0]])
        ):
            rid = self.waiting.popleft()
            budget -= self.lengths[rid]
            self.running[rid] = self.free_slots.pop()
            self.kv.reserve(rid, self.totals[rid])
            prefill.append(rid)
        train = None
        if self.jobs and not (self.last_pass_trained and (prefill or self.waiting)):
            train = self.jobs[0]
            self.jobs.rotate(-1)
        self.last_pass_trained = train is not None
        return PassPlan(tuple(prefill), decode, train)
