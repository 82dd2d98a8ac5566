"""Generation messages to engine types and back: GenerateRequest / TokenizeRequest prompts, sampling and
stopping, n completions, TokenEvent to GenerateResponse. Validation errors name the field."""

from __future__ import annotations

import dataclasses
import math
import secrets
import uuid
from typing import Any

from zostream import defaults as D
from zostream.engine.errors import RequestError
from zostream.engine.generation import FinishReason, GenerateRequest, StopParams, TokenEvent
from zostream.engine.sampling import MAX_SEED, SamplingParams
from zostream.v1 import generation_pb2

from .convert import check_id, wire_error

MAX_PROMPT_CHARS = D.MAX_PROMPT_CHARS
MAX_MESSAGES = D.MAX_CHAT_MESSAGES

FINISH = {
    FinishReason.MAX_TOKENS: generation_pb2.FINISH_REASON_MAX_TOKENS,
    FinishReason.EOS_TOKEN: generation_pb2.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: generation_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    FinishReason.TIME_LIMIT: generation_pb2.FINISH_REASON_TIME_LIMIT,
    FinishReason.ERROR: generation_pb2.FINISH_REASON_ERROR,
}


def prompt_ids(
    req: generation_pb2.GenerateRequest | generation_pb2.TokenizeRequest, engine: Any
) -> list[int]:
    which = req.WhichOneof("prompt" if isinstance(req, generation_pb2.GenerateRequest) else "input")
    if which == "text":
        if len(req.text) > MAX_PROMPT_CHARS:
            raise RequestError(f"is longer than {MAX_PROMPT_CHARS} characters", "text")
        if not req.text:
            raise RequestError("is empty; send a prompt", "text")
        return engine.encode_prompt(req.text)
    if which == "token_ids":
        ids = list(req.token_ids.ids)
        vocab = engine.spec.vocab
        if not ids:
            raise RequestError("is empty; send at least one token id", "token_ids")
        if any(t >= vocab for t in ids):
            raise RequestError(f"token ids must be < vocab size {vocab}", "token_ids")
        return ids
    if which == "chat":
        msgs = req.chat.messages
        if not msgs or len(msgs) > MAX_MESSAGES:
            raise RequestError(f"send 1..{MAX_MESSAGES} messages", "chat.messages")
        for i, m in enumerate(msgs):
            if m.role not in ("system", "user", "assistant", "tool"):
                raise RequestError(
                    f"role must be system, user, assistant or tool, got {m.role[:20]!r}",
                    f"chat.messages[{i}].role",
                )
            if len(m.content) > MAX_PROMPT_CHARS:
                raise RequestError("is too long", f"chat.messages[{i}].content")
        try:
            return engine.encode_prompt(
                messages=[{"role": m.role, "content": m.content} for m in msgs],
                continue_final_message=req.chat.continue_final_message,
            )
        except RequestError as exc:
            raise wire_error(exc) from None
    raise RequestError("set one of text, token_ids or chat", "prompt")


def generate_request(
    req: generation_pb2.GenerateRequest, engine: Any, deadline_s: float | None
) -> GenerateRequest:
    s, st = req.sampling, req.stopping
    temperature = s.temperature if s.HasField("temperature") else D.TEMPERATURE
    if s.HasField("seed") and s.seed > MAX_SEED:
        raise RequestError(f"must be <= {MAX_SEED}", "sampling.seed")
    try:
        sampling = SamplingParams(
            temperature=float(temperature),
            top_k=int(s.top_k),
            top_p=float(s.top_p) if s.HasField("top_p") else D.TOP_P,
            repetition_penalty=(
                float(s.repetition_penalty) if s.HasField("repetition_penalty") else D.REPETITION_PENALTY
            ),
            seed=int(s.seed) if s.HasField("seed") else None,
        )
    except RequestError as exc:
        raise RequestError(str(exc).split(": ", 1)[-1], f"sampling.{exc.field}") from None
    lim = engine.limits
    max_new = int(st.max_new_tokens) or min(lim.max_new_tokens, D.MAX_NEW_TOKENS)
    if not math.isfinite(st.time_limit_seconds) or st.time_limit_seconds < 0:
        raise RequestError("must be a finite number of seconds >= 0", "stopping.time_limit_seconds")
    time_limit = st.time_limit_seconds
    if deadline_s is not None and deadline_s > 0:
        # End with TIME_LIMIT (and a final message) just before the client's deadline hits.
        margin = deadline_s * 0.9
        time_limit = min(time_limit, margin) if time_limit else margin
    if any(len(x) > D.MAX_STOP_CHARS for x in st.stop):
        raise RequestError(
            f"each stop sequence must be at most {D.MAX_STOP_CHARS} characters", "stopping.stop"
        )
    try:
        stopping = StopParams(
            max_new,
            tuple(st.stop),
            tuple(int(t) for t in st.stop_token_ids),
            st.ignore_eos,
            time_limit,
            include_stop=st.include_stop_sequence,
        )
    except RequestError as exc:
        raise RequestError(str(exc).split(": ", 1)[-1], f"stopping.{exc.field}") from None
    rid = check_id(req.request_id, "request_id") or "req-" + uuid.uuid4().hex[:16]
    adapter = check_id(req.adapter_id, "adapter_id")
    lp = req.logprobs
    if lp.top_logprobs > D.MAX_TOP_LOGPROBS:
        raise RequestError(f"must be in 0..{D.MAX_TOP_LOGPROBS}", "logprobs.top_logprobs")
    return GenerateRequest(
        rid,
        prompt_ids(req, engine),
        sampling,
        stopping,
        adapter,
        logprobs=int(lp.top_logprobs) if lp.tokens or lp.top_logprobs else None,
        prompt_logprobs=lp.prompt,
    )


def completions(req: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The engine requests of one Generate: `n` completions of one prompt, completion i sampling with
    seed + i (one seed picked here when the request set none, so every completion reports its own)."""
    if n > D.MAX_N:
        raise RequestError(f"must be at most {D.MAX_N} completions", "n")
    if n <= 1:
        return [req]
    seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(63)
    return [
        dataclasses.replace(
            req,
            request_id=f"{req.request_id}#{i}",
            sampling=dataclasses.replace(req.sampling, seed=(seed + i) % (MAX_SEED + 1)),
        )
        for i in range(n)
    ]


def logprobs_pb(items) -> list[generation_pb2.TokenLogprob]:
    return [
        generation_pb2.TokenLogprob(
            token_id=x.token_id,
            logprob=x.logprob,
            top=[generation_pb2.Logprob(token_id=t, logprob=v) for t, v in x.top],
        )
        for x in items
    ]


def generate_response(
    ev: TokenEvent,
    final_text: str | None = None,
    token_ids=None,
    logprobs=None,
    prompt_logprobs=None,
    request_id: str | None = None,
    index: int = 0,
) -> generation_pb2.GenerateResponse:
    out = generation_pb2.GenerateResponse(
        request_id=ev.request_id if request_id is None else request_id,
        index=index,
        token_ids=list(token_ids if token_ids is not None else ev.token_ids),
        text=final_text if final_text is not None else ev.text,
        logprobs=logprobs_pb(logprobs if logprobs is not None else ev.logprobs),
        prompt_logprobs=logprobs_pb(prompt_logprobs if prompt_logprobs is not None else ev.prompt_logprobs),
    )
    if ev.finish_reason is not None:
        out.finish_reason = FINISH[ev.finish_reason]
        out.usage.prompt_tokens = ev.prompt_tokens
        out.usage.completion_tokens = ev.completion_tokens
        out.seed = ev.seed
        if ev.error:
            out.error.code, out.error.message = "INVALID_ARGUMENT", ev.error
    return out
