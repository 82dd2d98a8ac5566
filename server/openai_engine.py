"""The HTTP front end's one link to the engine: submit requests, yield their events, clean up.

The same bookkeeping as the gRPC Generate servicer (admission, the in-flight set that drain waits
on, abort when the client goes away, one finished-request sample per request), labelled api="http".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from zostream.engine.generation import FinishReason, GenerateRequest, TokenEvent

API = "http"


class Run:
    """Requests submitted together (the choices of one OpenAI call), and their events as they arrive.

    `Run(app, reqs)` admits and submits at once, so a refused request is an error before any
    response starts. Closing `events()` early (the client went away) aborts what is still running.
    """

    def __init__(self, app: Any, reqs: list[GenerateRequest]) -> None:
        self.app, self.reqs = app, reqs
        self.engine = app.ready_engine()
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.index = {r.request_id: i for i, r in enumerate(reqs)}
        self.first: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        for r in reqs:
            r.callback = lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        ids = [r.request_id for r in reqs]
        app.admit(reqs, ids, field="")  # a refusal (too long, queue full) aborts the ones already in
        self.pending: set[str] = set(ids)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(index in reqs, event) until every request has finished."""
        try:
            while self.pending:
                ev: TokenEvent = await self.queue.get()
                rid = ev.request_id
                if rid not in self.pending:
                    continue
                req = self.reqs[self.index[rid]]
                self.tokens[rid] = self.tokens.get(rid, 0) + len(ev.token_ids)
                if rid not in self.first and ev.token_ids:
                    self.first[rid] = time.monotonic() - req.arrival
                if ev.finish_reason is not None:
                    self.pending.discard(rid)
                    self.app.inflight.discard(rid)
                    self.app.request_done(req, ev, self.first.get(rid), api=API)
                yield self.index[rid], ev
        finally:
            self.close()

    def close(self) -> None:
        """Abort what is still running; each still counts as one finished (cancelled) request."""
        for rid in list(self.pending):
            self.pending.discard(rid)
            self.app.inflight.discard(rid)
            self.engine.abort(rid)
            latency = time.monotonic() - self.reqs[self.index[rid]].arrival
            n = self.tokens.get(rid, 0)
            self.app.metrics.observe_request_done(latency, n, "cancelled", self.first.get(rid), api=API)


FINISH = {
    FinishReason.MAX_TOKENS: "length",
    FinishReason.TIME_LIMIT: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.CANCELLED: "stop",
}


def finish_reason(ev: TokenEvent) -> str:
    return FINISH.get(ev.finish_reason, "stop")
