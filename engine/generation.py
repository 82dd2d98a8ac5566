"""Generation requests, their sequences, and the prefill / decode workloads of a pass."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import RequestError
from .kv_cache import PagedKVCache
from .logprobs import TokenLogprob, token_logprobs
from .models.attention import AttentionBatch, KVCache, LoraSet
from .sampling import SamplingParams, make_generator, sample


class FinishReason(enum.Enum):
    MAX_TOKENS = "max_tokens"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    TIME_LIMIT = "time_limit"
    ERROR = "error"


@dataclass(frozen=True)
class StopParams:
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    time_limit_s: float = 0.0  # 0: none
    include_stop: bool = False  # keep the matched stop sequence in the text (default: cut it)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(
                f"must be an integer >= 1, got {self.max_new_tokens!r}", field="max_new_tokens"
            )
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 16:
            raise RequestError("stop sequences must be 1..16 non-empty strings", field="stop")
        if self.time_limit_s < 0 or self.time_limit_s != self.time_limit_s:
            raise RequestError(f"must be >= 0 seconds, got {self.time_limit_s!r}", field="time_limit")


@dataclass(frozen=True)
class TokenEvent:
    """What a request's callback receives: new token ids + text, and the end when finished."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int = 0
    error: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens 1.., on the first event only


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StopParams = field(default_factory=StopParams)
    adapter_id: str = ""
    callback: Callable[[TokenEvent], None] | None = None
    arrival: float = field(default_factory=time.monotonic)
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the k most likely
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (first event)


class Detokenizer:
    """Incremental detokenisation that never emits half a UTF-8 character."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        delta, self.text = text[len(self.text) :], text
        return delta


@dataclass
class Sequence:
    """A running request: its KV slot, tokens and sampling state."""

    req: GenerateRequest
    slot: int
    seed: int
    detok: Detokenizer
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the slot
    blocks: list[int] = field(default_factory=list)  # paged cache: block table for the tokens so far
    finish: FinishReason | None = None
    first_token_time: float | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # computed at prefill when asked for
    emitted: int = 0  # characters of detok.text already sent to the client
    text_end: int | None = None  # where the visible text ends once a stop sequence matched

    @property
    def tokens(self) -> list[int]:
        return self.req.prompt_ids + self.output

    def check_stop(self, token: int, eos_ids: set[int]) -> FinishReason | None:
        st = self.req.stopping
        if token in st.stop_token_ids:  # documented as EOS: "an end-of-sequence token (or one of ...)"
            return FinishReason.EOS_TOKEN
        if not st.ignore_eos and token in eos_ids:
            return FinishReason.EOS_TOKEN
        if st.stop:
            end = find_stop(self.detok.text, st.stop, self.emitted, st.include_stop)
            if end is not None:
                self.text_end = end
                return FinishReason.STOP_SEQUENCE
        if len(self.output) >= st.max_new_tokens:
            return FinishReason.MAX_TOKENS
        if st.time_limit_s and time.monotonic() - self.req.arrival > st.time_limit_s:
            return FinishReason.TIME_LIMIT
        return None

    def take_text(self, final: bool) -> str:
        """Text not yet sent. Held back while its tail could still become a stop sequence, unless final."""
        text = self.detok.text
        if self.text_end is not None:
            end = self.text_end
        elif final:
            end = len(text)
        else:
            end = len(text) - _stop_prefix_len(text, self.req.stopping.stop)
        end = max(end, self.emitted)
        delta, self.emitted = text[self.emitted : end], end
        return delta


def find_stop(text: str, stops: tuple[str, ...], emitted: int, include: bool) -> int | None:
    """End of the visible text when one of `stops` occurs in `text` (the earliest match wins), else None.

    Only text from `emitted` on is searched (the rest was sent, so it held no match); `include` keeps
    the matched sequence."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s, emitted)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, len(s))
    if best is None:
        return None
    return best[0] + best[1] if include else best[0]


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def new_sequence(
    req: GenerateRequest, slot: int, seed: int, tokenizer: Any, device: torch.device
) -> Sequence:
    gen = None if req.sampling.greedy else make_generator(seed, device)
    return Sequence(req, slot, seed, Detokenizer(tokenizer, req.prompt_ids), gen)


class GenerationWorkload:
    """A batch of sequences advancing by their un-cached tokens (prefill) or one token (decode)."""

    def __init__(
        self,
        family: Any,
        spec: Any,
        seqs: list[Sequence],
        cache: KVCache | PagedKVCache,
        device: torch.device,
        lora_for: Callable[[list[Sequence], int], LoraSet | None] | None = None,
    ) -> None:
        self.fam, self.spec, self.seqs, self.device = family, spec, seqs, device
        self.lora_for = lora_for
        chunks = [s.tokens[s.num_cached :] for s in seqs]
        T = max(len(c) for c in chunks)
        ids = torch.zeros(len(seqs), T, dtype=torch.int64)
        for b, c in enumerate(chunks):
            ids[b, : len(c)] = torch.tensor(c)
        self.ids = ids.to(device)
        self.lens = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
        past = torch.tensor([s.num_cached for s in seqs], dtype=torch.int64, device=device)
        if isinstance(cache, PagedKVCache):
            tables = [s.blocks for s in seqs]
            self.attn = AttentionBatch.build_paged(self.lens.to(device), T, past, cache, tables)
        else:
            slots = torch.tensor([s.slot for s in seqs], dtype=torch.int64, device=device)
            self.attn = AttentionBatch.build(self.lens.to(device), T, past, cache, slots)
        self.h: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # [B,V] at each row's last valid token

    def begin(self, outer: dict[str, torch.Tensor]) -> None:
        self.h = self.fam.embed(outer, self.ids, self.attn.positions, self.spec)

    def block(self, i: int, w: dict[str, torch.Tensor]) -> None:
        lora = self.lora_for(self.seqs, i) if self.lora_for else None
        self.h = self.fam.block(self.h, w, self.attn.layer(i), self.spec, lora)

    def end(self, outer: dict[str, torch.Tensor]) -> None:
        last = (self.lens - 1).to(self.device)
        h_last = self.h[torch.arange(len(self.seqs), device=self.device), last][:, None]  # [B,1,H]
        self.logits = self.fam.head(h_last, outer, self.spec)[:, 0].float()
        for b, s in enumerate(self.seqs):
            if s.req.prompt_logprobs and s.prompt_logprobs is None and s.num_cached == 0:
                # Position j predicts prompt token j+1: the head over every position but the last.
                n = int(self.lens[b])
                logits = self.fam.head(self.h[b : b + 1, : n - 1], outer, self.spec)[0]  # [n-1,V]
                top = [s.req.logprobs or 0] * (n - 1)
                s.prompt_logprobs = tuple(token_logprobs(logits, self.ids[b, 1:n], top)) if n > 1 else ()
        self.h = None

    def sample(self) -> list[int]:
        """Next token per sequence; only called after the pass (logits are ready)."""
        seen = [torch.tensor(s.tokens, dtype=torch.int64, device=self.device) for s in self.seqs]
        toks = sample(
            self.logits, [s.req.sampling for s in self.seqs], [s.generator for s in self.seqs], seen
        )
        for s, n in zip(self.seqs, self.lens.tolist(), strict=True):
            s.num_cached += n
        return toks.tolist()

    def logprobs(self, tokens: list[int]) -> list[TokenLogprob | None]:
        """Per sequence: the chosen token's logprob and its request's top-k, or None if not asked."""
        rows = [b for b, s in enumerate(self.seqs) if s.req.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(self.seqs)
        if rows:
            idx = torch.tensor(rows, device=self.logits.device)
            toks = torch.tensor([tokens[b] for b in rows])
            got = token_logprobs(self.logits[idx], toks, [self.seqs[b].req.logprobs for b in rows])
            for b, lp in zip(rows, got, strict=True):
                out[b] = lp
        return out
