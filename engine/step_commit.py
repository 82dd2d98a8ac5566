"""A pass's generation outputs committed: logits sampled into tokens, tokens emitted as events, finished
sequences reported; and StepStats, what one `Engine.step()` did (the metrics module turns it into
Prometheus samples). Runs on the engine thread, after the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .generation import FinishReason, GenerateRequest, GenerationWorkload, TokenEvent


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


@dataclass(frozen=True)
class Moved:
    """Running totals of what passes move (the streamer's and the KV offload's); a pass's share is the
    difference of two snapshots."""

    h2d_bytes: int
    d2h_bytes: int
    transfer_seconds: float
    stall_seconds: float
    kv_bytes_h2d: int
    kv_bytes_d2h: int

    @staticmethod
    def now(stream_stats: Any, offload: Any) -> Moved:
        """stream_stats: a streamer.StreamStats; offload: the cache's kv_offload.KVOffload, or None."""
        st = stream_stats
        kv = (offload.h2d_bytes, offload.d2h_bytes) if offload is not None else (0, 0)
        return Moved(st.h2d_bytes, st.d2h_bytes, st.transfer_seconds, st.stall_seconds, *kv)

    def count_into(self, stats: StepStats, before: Moved) -> None:
        """stats gets what moved between `before` and this snapshot."""
        stats.h2d_bytes = self.h2d_bytes - before.h2d_bytes
        stats.d2h_bytes = self.d2h_bytes - before.d2h_bytes
        stats.transfer_seconds = self.transfer_seconds - before.transfer_seconds
        stats.stall_seconds = self.stall_seconds - before.stall_seconds
        stats.kv_bytes_h2d = self.kv_bytes_h2d - before.kv_bytes_h2d
        stats.kv_bytes_d2h = self.kv_bytes_d2h - before.kv_bytes_d2h


# (request id, reason, error) -> the final event, or None if the request had already finished
Finish = Callable[[str, FinishReason, str], "TokenEvent | None"]


def emit(req: GenerateRequest, ev: TokenEvent) -> None:
    if req.callback is not None:
        req.callback(ev)


def commit_generation(
    kind: str,
    wl: GenerationWorkload,
    stats: StepStats,
    now: float,
    eos_ids: set[int],
    kv_bytes_per_token: int,
    finish: Finish,
) -> None:
    """Sample one token per sequence of a prefill or decode workload, emit it, and `finish` the sequences
    that stop (counted in stats)."""
    n_new = int(wl.lens.sum())
    stats.kv_bytes_written += n_new * kv_bytes_per_token
    stats.kv_bytes_read += len(wl.seqs) * wl.attn.kv_len * kv_bytes_per_token
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
            stats.finished.append(finish(s.req.request_id, FinishReason.ERROR, msg))
            continue
        if s.first_token_time is None:
            s.first_token_time = now
            stats.first_token_latencies.append(now - s.req.arrival)
        s.output.append(tok)
        s.detok.add(tok)
        reason = s.check_stop(tok, eos_ids)
        delta = s.take_text(final=reason is not None)
        first = len(s.output) == 1
        emit(
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
            stats.finished.append(finish(s.req.request_id, reason, ""))
