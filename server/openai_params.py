"""OpenAI request bodies -> engine requests. Every error names the OpenAI parameter (`param`).

The body becomes a zostream.v1.GenerateRequest and goes through the same conversion as gRPC
(convert_generation.generate_request): one set of limits and defaults for both front ends. What the gRPC
conversion reports under its own field names is renamed to the OpenAI parameter here.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zostream import defaults as D
from zostream.engine.errors import NotFoundError, RequestError
from zostream.engine.generation import GenerateRequest
from zostream.engine.sampling import MAX_SEED
from zostream.v1 import generation_pb2

from . import convert_generation as CG

MAX_PROMPTS = 64  # prompts in one /v1/completions call
MAX_TOP_LOGPROBS = 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# Parameters accepted only at their neutral value (anything else would be silently ignored).
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "best_of": 1, "suffix": None}


@dataclass
class GenPlan:
    """One OpenAI call: requests[p * n + i] is choice i of prompt p."""

    model: str
    requests: list[GenerateRequest]
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs; k >= 0: the chosen token and the k most likely
    echo: list[str] = field(default_factory=list)  # completions with echo: each prompt's text
    max_name: str = "max_tokens"  # which parameter set the token budget (for error messages)


def base_model_id(engine: Any) -> str:
    return Path(engine.cfg.model_dir).name


def resolve_model(engine: Any, model: Any) -> str:
    """The adapter id a `model` names ("" for the base model)."""
    if not isinstance(model, str) or not model:
        raise RequestError("is required: the base model id or an adapter id from GET /v1/models", "model")
    if model == base_model_id(engine):
        return ""
    if model in engine.adapters:
        return model
    if ":" in model:  # a checkpoint, `<job_id>:ckpt-step-<N>` (GET /v1/fine_tuning/jobs/{id}/checkpoints)
        engine.check_adapter(model, "model")
        return model
    raise NotFoundError(f"the model {model[:128]!r} does not exist; GET /v1/models lists them", "model")


# ---- typed getters ---------------------------------------------------------------------------------
def _num(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise RequestError(f"must be a number in [{lo:g}, {hi:g}], got {str(v)[:40]}", name)
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"must be an integer in [{lo}, {hi}], got {str(v)[:40]}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"must be true or false, got {str(v)[:40]}", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise RequestError("must be a non-empty string or an array of up to 16 non-empty strings", "stop")
    return tuple(stops)


def _neutral(body: dict) -> None:
    for name, neutral in NEUTRAL.items():
        v = body.get(name)
        if v is not None and v != neutral and v != {}:
            raise RequestError(f"is not supported by this server; omit it or send {neutral}", name)
    if body.get("tools") or body.get("functions"):
        name = "tools" if body.get("tools") else "functions"
        raise RequestError("tool calling is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("only {'type': 'text'} is supported", "response_format")


# ---- the two endpoints -----------------------------------------------------------------------------
def chat_plan(body: dict, engine: Any) -> GenPlan:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("is required: a non-empty array of {role, content} messages", "messages")
    pb = generation_pb2.GenerateRequest()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError("must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"must be one of {', '.join(ROLES)}, got {str(role)[:20]!r}", f"messages[{i}].role"
            )
        pb.chat.messages.add(
            role=ROLES[role], content=message_text(m.get("content"), f"messages[{i}].content")
        )
    top = None
    if _bool(body, "logprobs"):
        top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif body.get("top_logprobs") is not None:
        raise RequestError("needs logprobs: true", "top_logprobs")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _plan(body, engine, [pb], max_name, top)


def completion_plan(body: dict, engine: Any) -> GenPlan:
    prompt = body.get("prompt")
    prompts: list[generation_pb2.GenerateRequest] = []
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        items = [prompt]  # one prompt of token ids
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise RequestError("is required: a string, an array of strings, or token ids", "prompt")
    if len(items) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    for p in items:
        pb = generation_pb2.GenerateRequest()
        if isinstance(p, str):
            pb.text = p
        elif (
            isinstance(p, list)
            and p
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)
        ):
            pb.token_ids.ids.extend(p)
        else:
            raise RequestError(
                "each prompt must be a non-empty string or an array of token ids >= 0", "prompt"
            )
        prompts.append(pb)
    top = _int(body, "logprobs", 0, 5)
    echo = _bool(body, "echo")
    max_tokens = body.get("max_tokens", 16)  # OpenAI's default for completions
    plan = _plan({**body, "max_tokens": max_tokens}, engine, prompts, "max_tokens", top)
    if echo:
        plan.echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in items]
        for req in plan.requests:  # OpenAI reports the echoed prompt's logprobs too
            req.prompt_logprobs = top is not None
    return plan


def message_text(content: Any, name: str) -> str:
    """A message's content: a string, null (an assistant turn), or an array of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    "only text parts ({'type': 'text', 'text': str}) are supported", f"{name}[{j}]"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError("must be a string or an array of text parts", name)


def _plan(body: dict, engine: Any, prompts: list, max_name: str, top: int | None) -> GenPlan:
    _neutral(body)
    model = body.get("model")
    adapter = resolve_model(engine, model)
    n = _int(body, "n", 1, D.MAX_N) or 1
    stop = _stop(body)
    temperature = _num(body, "temperature", 0.0, 2.0)
    top_p = _num(body, "top_p", 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise RequestError(f"must be an integer in [0, {MAX_SEED}], got {str(seed)[:40]}", "seed")
    max_new = _int(body, max_name, 1, engine.limits.max_new_tokens)
    top_k = _int(body, "top_k", 0, 1 << 20)  # extras some OpenAI clients send (vLLM's names)
    rep = _num(body, "repetition_penalty", 0.0, 100.0)
    ignore_eos = _bool(body, "ignore_eos")
    opts = body.get("stream_options")
    if opts is not None and (
        not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)
    ):
        raise RequestError("must be an object {include_usage: bool}", "stream_options")
    stream = _bool(body, "stream")
    rid = "cmpl-" + uuid.uuid4().hex[:24]
    reqs = []
    for p, pb in enumerate(prompts):
        pb.request_id = f"{rid}-{p}"
        pb.adapter_id = adapter
        pb.sampling.temperature = 1.0 if temperature is None else temperature  # OpenAI's default
        if top_p is not None:
            pb.sampling.top_p = top_p
        if seed is not None:
            pb.sampling.seed = seed
        if top_k is not None:
            pb.sampling.top_k = top_k
        if rep is not None:
            pb.sampling.repetition_penalty = rep
        if max_new is not None:
            pb.stopping.max_new_tokens = max_new
        pb.stopping.stop.extend(stop)
        pb.stopping.ignore_eos = ignore_eos
        req = _convert(pb, engine, max_name)
        req.logprobs = top
        # the n choices as gRPC makes them: choice i samples with seed + i (one seed picked if unset)
        reqs.extend(CG.completions(req, n))
    include_usage = bool(stream and opts and opts.get("include_usage"))
    return GenPlan(str(model), reqs, n, stream, include_usage, top, max_name=max_name)


_RENAME = [
    (re.compile(r"^chat\.messages"), "messages"),
    (re.compile(r"^chat$"), "messages"),
    (re.compile(r"^(text|token_ids|prompt)$"), "prompt"),
    (re.compile(r"^sampling\."), ""),
    (re.compile(r"^stopping\.stop"), "stop"),
    (re.compile(r"^adapter_id$"), "model"),
]


def param_name(wire_field: str, max_name: str) -> str:
    """The OpenAI parameter for a field named by the gRPC conversion or the engine."""
    if wire_field in ("stopping.max_new_tokens", "max_new_tokens"):
        return max_name
    for pat, repl in _RENAME:
        if pat.search(wire_field):
            return pat.sub(repl, wire_field, count=1)
    return wire_field


def rename(exc: RequestError, max_name: str) -> RequestError:
    msg = str(exc.args[0]) if exc.args else str(exc)
    if exc.field:
        msg = msg.removeprefix(f"{exc.field}: ")
    return RequestError(
        msg.replace("max_new_tokens", max_name),
        param_name(exc.field, max_name),
        code=exc.code,
        reason=getattr(exc, "reason", ""),
        retry_after_s=getattr(exc, "retry_after_s", None),
    )


def _convert(pb: generation_pb2.GenerateRequest, engine: Any, max_name: str) -> GenerateRequest:
    try:
        return CG.generate_request(pb, engine, None)
    except RequestError as exc:
        raise rename(exc, max_name) from None
