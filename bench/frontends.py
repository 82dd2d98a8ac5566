"""Front-end overhead: the same generation workload through the engine alone, gRPC and the OpenAI HTTP API.

One server process (in this process, as `zostream serve --http-port` runs it) serves all three
paths from one engine thread. `C` client threads each run `R` streamed greedy requests of one
prompt; every path generates the same tokens. The floor is the engine with no front end
(`engine.submit` with a callback, from the same client threads): the ratios say what the gRPC and
HTTP layers (serialisation, event loop, SSE) cost on top of it. `http-raw` is the HTTP path read
with plain httpx, `http` with the openai package (its per-chunk parsing runs on the same CPU).
Client and server share the machine. Timings are wall clock; ratios are only comparable within one
run; each path's best of `--rounds` interleaved rounds is kept.

    python bench/frontends.py [--model DIR] [--clients 1,8] [--requests 4] [--new-tokens 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import log, machine_line, ratio, split_list, table

PROMPT = "The capital of France is"


def one_request(kind: str, ctx: dict, new_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, tokens) of one streamed greedy request."""
    t0 = time.perf_counter()
    first = None
    n = 0
    if kind == "engine":
        from zostream.engine.generation import GenerateRequest, StopParams
        from zostream.engine.sampling import SamplingParams

        done = threading.Event()
        seen: list[float] = []

        def cb(ev) -> None:
            if ev.token_ids and not seen:
                seen.append(time.perf_counter())
            ctx["count"][0] += len(ev.token_ids)
            if ev.finish_reason is not None:
                done.set()

        ctx["count"] = [0]
        req = GenerateRequest(
            "bench-" + uuid.uuid4().hex[:12],
            list(ctx["prompt_ids"]),
            SamplingParams(temperature=0.0),
            StopParams(max_new_tokens=new_tokens),
            callback=cb,
        )
        ctx["engine"].submit(req)
        done.wait(600)
        first, n = (seen[0] if seen else None), ctx["count"][0]
    elif kind == "grpc":
        from zostream.v1 import generation_pb2 as G

        req = G.GenerateRequest(text=PROMPT, stream=True)
        req.sampling.temperature = 0.0
        req.stopping.max_new_tokens = new_tokens
        for r in ctx["stub"].Generate(req, timeout=600):
            if r.token_ids and first is None:
                first = time.perf_counter()
            n += len(r.token_ids)
    elif kind == "http-raw":  # the same HTTP request without the openai package's parsing
        import json

        body = {"model": ctx["model"], "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        with ctx["httpx"].stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                c = json.loads(line[6:])
                if c["choices"] and c["choices"][0]["text"] and first is None:
                    first = time.perf_counter()
                if c.get("usage"):
                    n = c["usage"]["completion_tokens"]
    else:
        stream = ctx["openai"].completions.create(
            model=ctx["model"], prompt=PROMPT, max_tokens=new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for c in stream:
            if c.choices and c.choices[0].text and first is None:
                first = time.perf_counter()
            if c.usage is not None:
                n = c.usage.completion_tokens
    end = time.perf_counter()
    return (first or end) - t0, end - t0, n


def run_path(kind: str, make_ctx: Callable[[], dict], clients: int, requests: int, new_tokens: int) -> dict:
    """C threads x R sequential requests; tokens/s over the whole run, mean TTFT and latency."""
    ctxs = [make_ctx() for _ in range(clients)]
    one_request(kind, ctxs[0], new_tokens)  # warm-up (connections, first pass)

    def worker(ctx: dict) -> list[tuple[float, float, int]]:
        return [one_request(kind, ctx, new_tokens) for _ in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, ctxs) for r in rs]
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_s": statistics.mean(r[0] for r in results),
        "latency_s": statistics.mean(r[1] for r in results),
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory with a tokenizer (default: the demo model)")
    ap.add_argument("--clients", default="1,8", help="concurrent client threads, comma-separated")
    ap.add_argument("--requests", type=int, default=4, help="requests per client thread")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path (best kept)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import grpc
    import httpx
    import openai

    from zostream.engine.config import EngineConfig, LimitsConfig
    from zostream.server.app import ServerConfig, start_in_thread
    from zostream.v1 import generation_pb2_grpc

    torch.set_num_threads(args.threads)
    if args.model is None:
        from zostream.clients.demo_model import demo_model_dir

        args.model = str(demo_model_dir(fetch=True))
    clients = [int(c) for c in split_list(args.clients)]
    eng = EngineConfig(args.model, device=args.device, compute_dtype="float32",
                       limits=LimitsConfig(max_batch=max(clients), max_seq_len=512))  # fmt: skip
    data = tempfile.mkdtemp(prefix="zostream-bench-http-")
    app, stop = start_in_thread(ServerConfig(eng, data, port=0, metrics_port=None, http_port=0), timeout=300)
    if app.engine is None:
        print(f"the engine did not start: {app.engine_error}", file=sys.stderr)
        stop()
        return 1
    try:
        model = Path(args.model).name
        ids = app.engine.encode_prompt(PROMPT)
        makers = {
            "engine": lambda: {"engine": app.engine, "prompt_ids": ids},
            "grpc": lambda: {
                "stub": generation_pb2_grpc.TextGenerationStub(
                    grpc.insecure_channel(f"127.0.0.1:{app.bound_port}")
                )
            },
            "http-raw": lambda: {
                "httpx": httpx.Client(base_url=f"http://127.0.0.1:{app.http_port}", timeout=600),
                "model": model,
            },
            "http": lambda: {
                "openai": openai.OpenAI(
                    base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="-", max_retries=0
                ),
                "model": model,
            },
        }
        rows = []
        for c in clients:
            res: dict[str, dict] = {}
            for round_ in range(args.rounds):  # interleaved rounds; the best of each path is kept
                for kind, make in makers.items():
                    log(f"{kind}: {c} clients x {args.requests} x {args.new_tokens} tokens, round {round_}")
                    r = run_path(kind, make, c, args.requests, args.new_tokens)
                    if kind not in res or r["tokens_per_s"] > res[kind]["tokens_per_s"]:
                        res[kind] = r
            floor = res["engine"]["tokens_per_s"]
            for kind, r in res.items():
                vs = ratio(r["tokens_per_s"], floor)
                rows.append([c, kind, r["tokens"], r["tokens_per_s"], vs, r["ttft_s"], r["latency_s"]])
        print(machine_line(torch.device(args.device)) + f"; model {model}; {args.new_tokens} new tokens")
        print()
        headers = ["clients", "path", "tokens", "tokens/s", "vs engine", "mean TTFT s", "mean latency s"]
        print(table("front-end overhead (streamed, greedy)", headers, rows))
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
