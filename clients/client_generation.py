"""The client's TextGeneration calls (generate, generate_stream, completions, abort, tokenize,
model_info) and generation output as frozen dataclasses."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from zostream.clients.client_base import ClientBase, to_dict
from zostream.clients.errors import error
from zostream.v1 import generation_pb2


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


def _finish_reason(value: int) -> str:
    return (
        "" if value == 0 else generation_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
    )


def _check_engine_error(r: generation_pb2.GenerateResponse) -> None:
    if r.finish_reason == generation_pb2.FINISH_REASON_ERROR:
        raise error(r.error.code or "INTERNAL", r.error.message or "generation failed in the engine")


def _chat(messages: list[dict[str, str]], continue_final_message: bool = False) -> generation_pb2.Chat:
    return generation_pb2.Chat(
        messages=[generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        continue_final_message=continue_final_message,
    )


class GenerationCalls(ClientBase):
    """TextGeneration: the calls that generate and tokenize."""

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
