"""The TextGeneration service: Generate (streamed or not, n completions), Abort, Tokenize, GetModelInfo."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from zostream.engine.errors import RequestError
from zostream.v1 import generation_pb2, generation_pb2_grpc

from . import convert as C
from . import convert_generation as CG
from .model_info import model_info
from .rpc import rpc


class _Acc:
    """One completion's output so far, for a non-streamed Generate."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.lps: list = []
        self.plps: tuple = ()
        self.n_tokens = 0

    def add(self, ev) -> None:
        self.texts.append(ev.text)
        self.ids.extend(ev.token_ids)
        self.lps.extend(ev.logprobs)
        self.plps = self.plps or ev.prompt_logprobs


class TextGeneration(generation_pb2_grpc.TextGenerationServicer):
    def __init__(self, app: Any) -> None:
        self.app = app

    @rpc
    async def Generate(self, request, context):
        engine = self.app.ready_engine()
        # Tokenizing (a long prompt, a chat template) runs off the event loop: other RPCs go on meanwhile.
        req = await asyncio.to_thread(CG.generate_request, request, engine, context.time_remaining())
        subs = CG.completions(req, request.n)  # n > 1: one engine request per completion
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, sub in enumerate(subs):
            sub.callback = lambda ev, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
        self.app.admit(subs, [req.request_id], wire=C.wire_error)
        submitted = [sub.request_id for sub in subs]
        self.app.groups[req.request_id] = submitted
        # Per completion: first-token latency, and (not streaming) what it produced so far.
        first: list[float | None] = [None] * len(subs)
        last: list[float | None] = [None] * len(subs)  # when each completion's previous token came
        acc = [_Acc() for _ in subs]
        done = [False] * len(subs)
        try:
            while not all(done):
                i, ev = await queue.get()
                sub, a = subs[i], acc[i]
                a.n_tokens += len(ev.token_ids)
                if ev.token_ids:
                    now = time.monotonic()
                    if first[i] is None:
                        first[i] = now - sub.arrival
                    if last[i] is not None:
                        self.app.metrics.observe_inter_token(now - last[i])
                    last[i] = now
                if ev.finish_reason is not None:
                    done[i] = True
                    self.app.request_done(sub, ev, first[i])
                if request.stream:
                    yield CG.generate_response(ev, request_id=req.request_id, index=i)
                    continue
                a.add(ev)
                if ev.finish_reason is not None:  # the final event may carry text held back for a stop
                    yield CG.generate_response(
                        ev, "".join(a.texts), a.ids, a.lps, a.plps, request_id=req.request_id, index=i
                    )
        finally:
            self.app.inflight.discard(req.request_id)
            self.app.groups.pop(req.request_id, None)
            for i, sub in enumerate(subs):
                if not done[i]:  # client cancelled or deadline passed: still a finished request
                    engine.abort(sub.request_id)
                    self.app.metrics.observe_request_done(
                        time.monotonic() - sub.arrival, acc[i].n_tokens, "cancelled", ttft_s=first[i]
                    )

    @rpc
    async def Abort(self, request, context):
        engine = self.app.ready_engine()
        for rid in request.request_ids:
            for sub in self.app.groups.get(rid, [rid]):  # every completion of an n > 1 request
                engine.abort(sub)
        return generation_pb2.AbortResponse(
            aborted_request_ids=[r for r in request.request_ids if r in self.app.inflight]
        )

    @rpc
    async def Tokenize(self, request, context):
        engine = self.app.ready_engine()
        if request.WhichOneof("input") is None:
            raise RequestError("set text or chat", "input")
        ids = await asyncio.to_thread(CG.prompt_ids, request, engine)
        return generation_pb2.TokenizeResponse(
            token_ids=ids, tokens=engine.tokenizer.convert_ids_to_tokens(ids)
        )

    @rpc
    async def GetModelInfo(self, request, context):
        return model_info(self.app)
