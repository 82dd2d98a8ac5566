"""Decides what the next pass over the layers carries. Imports no torch.

Generation: continuous batching. Waiting requests are admitted, in arrival order, while a
batch row is free, the paged KV cache has free blocks for their prompt (after the blocks the
running sequences take this pass), and the pass's prefill-token budget lasts; running requests
decode one token a pass. When a pass's decode rows need more blocks than are free, the most
recently admitted sequences are preempted: their blocks go back, they wait at the head of the
queue and are prefilled again (prompt + tokens so far) when blocks free up. The oldest sequence
is never preempted, so it always finishes. A request whose prompt + max_new_tokens exceeds the
whole pool is refused up front.
Fine-tuning: one ZO step rides along every pass, except that a pass right after a
training pass skips training when requests wait for their first token, so time to
first token stays bounded by one training pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import LimitsConfig
from .errors import RequestError
from .kv_blocks import BlockAllocator, blocks_for


@dataclass(frozen=True)
class PassPlan:
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    train_job: str | None = None
    preempted: tuple[str, ...] = ()  # back in the queue: their K/V were dropped, they prefill again

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
        """Queue an admitted request. Admission (check_fits and the queue bound) is Engine.submit's, once,
        on the caller's thread: what it let in always fits here."""
        self.waiting.append(request_id)
        self.lengths[request_id] = prompt_len

    def slot_of(self, request_id: str) -> int:
        return self.running[request_id]

    def finish(self, request_id: str) -> None:
        if request_id in self.running:
            self.free_slots.append(self.running.pop(request_id))
            self.kv.release(request_id)
        elif request_id in self.waiting:
            self.waiting.remove(request_id)
        self.lengths.pop(request_id, None)

    # ---- jobs -------------------------------------------------------------------------------
    def add_job(self, job_id: str) -> None:
        if job_id not in self.jobs:
            self.jobs.append(job_id)

    def remove_job(self, job_id: str) -> None:
        if job_id in self.jobs:
            self.jobs.remove(job_id)

    # ---- the plan ---------------------------------------------------------------------------
    def schedule(self, context: Mapping[str, int] | None = None) -> PassPlan:
        """The next pass. context[rid]: positions a running rid has after this pass (its tokens so
        far, prompt + generated); missing rids count as their prompt."""
        ctx = context or {}
        kv = self.kv
        size = {r: ctx.get(r, self.lengths.get(r, 1)) for r in self.running}
        growth = sum(kv.growth(r, n) for r, n in size.items())
        preempted: list[str] = []
        while growth > kv.free and len(self.running) > 1:
            rid = next(reversed(self.running))  # the most recently admitted
            growth -= kv.growth(rid, size[rid])
            self.free_slots.append(self.running.pop(rid))
            kv.release(rid)
            self.lengths[rid] = size[rid]
            self.waiting.appendleft(rid)
            preempted.append(rid)
        decode = tuple(self.running)
        prefill: list[str] = []
        budget = self.limits.max_prefill_tokens
        free = kv.free - growth
        while self.waiting and self.free_slots:
            n = self.lengths[self.waiting[0]]
            # A preempted sequence may be longer than the prefill budget: it goes alone.
            if (n > budget and prefill) or kv.blocks_for(n) > free:
                break
            rid = self.waiting.popleft()
            budget -= n
            free -= kv.blocks_for(n)
            self.running[rid] = self.free_slots.pop()
            prefill.append(rid)
        train = None
        if self.jobs and not (self.last_pass_trained and (prefill or self.waiting)):
            train = self.jobs[0]
            self.jobs.rotate(-1)
        self.last_pass_trained = train is not None
        return PassPlan(tuple(prefill), decode, train, tuple(preempted))
