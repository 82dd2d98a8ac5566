"""Requests run to completion in the caller's thread (`Engine.generate`: the `zostream generate`
command, tests, benches): the engine loop steps until every request has finished, and each request's
events are gathered into one final event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .generation import GenerateRequest, TokenEvent
from .loop import EngineLoop


def run_to_completion(engine: Any, requests: Iterable[GenerateRequest]) -> dict[str, TokenEvent]:
    """Submit `requests` to `engine` and step it until they finish; returns the final event per request id
    (all its tokens, text and logprobs). A request's own callback still sees every event."""
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
        engine.submit(req)
        finals.pop(req.request_id, None)
        texts[req.request_id] = []
    EngineLoop(engine).run_until(lambda: len(finals) >= len(texts))
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
