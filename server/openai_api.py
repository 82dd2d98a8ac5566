"""OpenAI generation endpoints: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from zostream.engine.errors import RequestError
from zostream.engine.generation import FinishReason, TokenEvent, TokenLogprob

from . import openai_params as P
from .http_app import error_sse, read_json
from .openai_engine import Run, finish_reason

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GenerationFailed(RequestError):
    """A request the engine ended with an error (a diverged adapter, an adapter deleted meanwhile)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "", code="INTERNAL")


def routes(app: Any) -> list[Route]:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": _models(app)})

    async def model(request: Request) -> Response:
        mid = request.path_params["model"]
        for m in _models(app):
            if m["id"] == mid:
                return JSONResponse(m)
        P.resolve_model(app.ready_engine(), mid)  # raises the 404 unless a checkpoint id
        job_id = mid.split(":", 1)[0]  # `<job_id>:ckpt-step-<N>`, not listed: any step of the job answers
        created = int(app.jobs.get(job_id).created_at)
        return JSONResponse(
            {
                "id": mid,
                "object": "model",
                "created": created,
                "owned_by": "zostream",
                "root": P.base_model_id(app.ready_engine()),
                "parent": job_id,
            }  # fmt: skip
        )

    async def chat(request: Request) -> Response:
        body = await read_json(request)
        # Tokenizing runs off the event loop (as in the gRPC service): other requests go on meanwhile.
        return await _respond(app, await asyncio.to_thread(P.chat_plan, body, app.ready_engine()), chat=True)

    async def completions(request: Request) -> Response:
        body = await read_json(request)
        plan = await asyncio.to_thread(P.completion_plan, body, app.ready_engine())
        return await _respond(app, plan, chat=False)

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


def _models(app: Any) -> list[dict]:
    e = app.ready_engine()
    base = P.base_model_id(e)
    out = [
        {"id": base, "object": "model", "created": 0, "owned_by": "zostream", "root": base, "parent": None}
    ]
    for aid in sorted(a for a in list(e.adapters) if ":" not in a):  # cached checkpoints come and go
        rec = app.jobs.jobs.get(aid)
        created = int(rec.created_at) if rec else 0
        out.append(
            {
                "id": aid,
                "object": "model",
                "created": created,
                "owned_by": "zostream",
                "root": base,
                "parent": base,
            }
        )
    return out


class _Logprobs:
    """Engine TokenLogprobs -> OpenAI's logprobs objects (chat: `content`; completions: parallel lists)."""

    FLOOR = -9999.0  # JSON has no -inf: a token the model rules out entirely

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tok, self.chat = tokenizer, chat
        self.texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self.texts:
            self.texts[token_id] = self.tok.decode([token_id])
        return self.texts[token_id]

    def format(self, lps: list[TokenLogprob], offset: int = 0, prompt: tuple | None = None) -> dict | None:
        """`prompt` (completions with echo): (first prompt token id, logprobs of the prompt tokens after
        it); they come first, the first token with a null logprob as OpenAI reports it."""
        if not lps and not self.chat and not prompt:
            return None
        if self.chat:
            return {"content": [self._entry(x.token_id, x.logprob, x.top) for x in lps], "refusal": None}
        head: list[TokenLogprob | None] = [None, *prompt[1]] if prompt else []
        ids = ([prompt[0]] + [x.token_id for x in prompt[1]] if prompt else []) + [x.token_id for x in lps]
        tokens = [self.text(i) for i in ids]
        every = head + list(lps)
        return {
            "tokens": tokens,
            "token_logprobs": [None if x is None else max(x.logprob, self.FLOOR) for x in every],
            "top_logprobs": [
                None if x is None else {self.text(i): max(v, self.FLOOR) for i, v in x.top} for x in every
            ],
            "text_offset": [offset + sum(len(t) for t in tokens[:j]) for j in range(len(tokens))],
        }

    def _entry(self, token_id: int, logprob: float, top: tuple = ()) -> dict:
        t = self.text(token_id)
        out = {"token": t, "logprob": max(logprob, self.FLOOR), "bytes": list(t.encode())}
        if top is not None:
            out["top_logprobs"] = [self._entry(i, v, None) for i, v in top]
        return out


class _Choice:
    """One choice's text, token count, finish and logprobs as events arrive. Stop strings were sent
    to the engine, which cuts them from the text and holds back a tail that could start one."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.final: TokenEvent | None = None
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # completions with echo and logprobs
        self.unsent = 0  # logprobs not yet sent in a stream chunk

    def add(self, ev: TokenEvent) -> str:
        self.logprobs.extend(ev.logprobs)
        if getattr(ev, "prompt_logprobs", None):
            self.prompt_logprobs = ev.prompt_logprobs
        piece = ev.text
        if ev.finish_reason is not None:
            if ev.finish_reason is FinishReason.ERROR:
                raise GenerationFailed(ev.error or "the request failed")
            self.final = ev
        self.text.append(piece)
        return piece

    @property
    def finish(self) -> str | None:
        return None if self.final is None else finish_reason(self.final)


def _usage(plan: P.GenPlan, choices: list[_Choice]) -> dict[str, int]:
    prompt = sum(c.final.prompt_tokens for c in choices[:: plan.n] if c.final)  # each prompt once
    completion = sum(c.final.completion_tokens for c in choices if c.final)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(app: Any, plan: P.GenPlan, chat: bool) -> Response:
    try:
        run = Run(app, plan.requests)  # admission errors are HTTP errors: no response has started
    except RequestError as exc:
        raise P.rename(exc, plan.max_name) from None
    choices = [_Choice() for _ in plan.requests]
    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {
        "id": cid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": "zostream-" + app.engine.store.fingerprint[:16],
    }
    lp = _Logprobs(app.engine.tokenizer, chat) if plan.top_logprobs is not None else None
    if plan.stream:
        return StreamingResponse(
            _sse(run, plan, choices, head, lp), media_type="text/event-stream", headers=SSE_HEADERS
        )
    async for i, ev in run.events():
        choices[i].add(ev)
    out = []
    for i, c in enumerate(choices):
        text = "".join(c.text)
        echo = plan.echo[i // plan.n] if plan.echo else ""
        prompt = (
            (plan.requests[i].prompt_ids[0], c.prompt_logprobs) if c.prompt_logprobs is not None else None
        )
        logprobs = lp.format(c.logprobs, 0 if prompt else len(echo), prompt) if lp else None
        if chat:
            out.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": c.finish,
                }
            )
        else:
            out.append({"index": i, "text": echo + text, "logprobs": logprobs, "finish_reason": c.finish})
    return JSONResponse({**head, "choices": out, "usage": _usage(plan, choices)})


async def _sse(
    run: Run, plan: P.GenPlan, choices: list[_Choice], head: dict, lp: _Logprobs | None
) -> AsyncIterator[bytes]:
    chat = head["object"] == "chat.completion"
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    sent = [0] * len(choices)  # characters sent per choice (completions' text_offset)

    def chunk(i: int, piece: str | None, finish: str | None, role: bool = False) -> bytes:
        logprobs = None
        if lp is not None and not role:  # the tokens that arrived since the last chunk
            c = choices[i]
            prompt, offset = None, sent[i]
            if c.prompt_logprobs is not None and c.unsent == 0:  # echo: the prompt's, with the first chunk
                prompt, offset = (plan.requests[i].prompt_ids[0], c.prompt_logprobs), 0
            logprobs, c.unsent = lp.format(c.logprobs[c.unsent :], offset, prompt), len(c.logprobs)
        sent[i] += len(piece or "")
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if piece:
                delta["content"] = piece
            c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            c = {"index": i, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}
        body = {**head, "choices": [c]}
        if plan.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n".encode()

    try:
        for i in range(len(choices)):
            if chat:
                yield chunk(i, None, None, role=True)
            elif plan.echo:
                yield chunk(i, plan.echo[i // plan.n], None)
        async for i, ev in run.events():
            piece = choices[i].add(ev)
            if piece or choices[i].final is not None:
                yield chunk(i, piece, choices[i].finish)
        if plan.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(plan, choices)})}\n\n".encode()
        yield b"data: [DONE]\n\n"
    except RequestError as exc:  # the status line went out already: the error is the last event
        yield error_sse(exc)
