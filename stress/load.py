"""Load generator: hold N concurrent Generate streams with mixed lengths and sampling for a bounded time
while a LoRA job trains, then probe admission (a request that can never fit, a burst past the queue).

    python -m stress.load --streams 64 --duration 600 --json-out load.json

Starts its own server (stress/serve.py on the tiny model, a subprocess on a loopback port) unless
--target names one. Every request has a deadline, so nothing can hang the run. Figures: requests by
outcome, errors other than the intended RESOURCE_EXHAUSTED (and the client's own cancels), time to first
token p50/p99, tokens/s, the server's RSS (and GPU memory on CUDA) sampled every second with its slope
after warm-up, the job's steps during the load, and the admission probes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from stress.common import (
    ServerProc,
    Stubs,
    free_port,
    markdown_table,
    percentile,
    report,
    rss_bytes,
    slope_per_minute,
    tiny_model,
)
from zostream.v1 import common_pb2 as Cm
from zostream.v1 import finetuning_pb2 as F
from zostream.v1 import generation_pb2 as G

INTENDED = {"RESOURCE_EXHAUSTED", "CLIENT_CANCELLED"}
FINISH = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in G.FinishReason.items()}


@dataclass
class Outcome:
    outcome: str  # finish reason (max_tokens, eos_token, ...) or a status code name
    ttft: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    problem: str = ""  # non-empty: a wrong answer (counted as an error)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)
            if o.problem or (o.outcome.isupper() and o.outcome not in INTENDED):
                self.errors.append(o.problem or o.outcome)


def random_request(rng: random.Random, rid: str, max_seq: int) -> tuple[G.GenerateRequest, dict[str, Any]]:
    """A request with a random prompt length, output length and sampler; `plan` says what the client does."""
    n_prompt = rng.choice([1, 2, 4, 8, 16, 32, 48])
    words = [rng.randint(1, 98) for _ in range(n_prompt)]
    max_new = min(rng.choice([1, 2, 4, 8, 16, 32, 64, 128]), max_seq - n_prompt)
    s = G.SamplingParams()
    kind = rng.random()
    if kind < 0.3:
        s.temperature = 0.0
    else:
        s.temperature = rng.uniform(0.2, 1.5)
        if rng.random() < 0.5:
            s.top_k = rng.randint(1, 60)
        if rng.random() < 0.5:
            s.top_p = rng.uniform(0.3, 1.0)
        if rng.random() < 0.3:
            s.repetition_penalty = rng.uniform(1.0, 1.5)
        if rng.random() < 0.5:
            s.seed = rng.randrange(2**63)
    st = G.StoppingCriteria(max_new_tokens=max_new, ignore_eos=rng.random() < 0.7)
    if rng.random() < 0.1:
        st.stop.append(str(rng.randint(1, 98)))
    if rng.random() < 0.1:
        st.stop_token_ids.append(rng.randint(1, 98))
    if rng.random() < 0.03:
        st.time_limit_seconds = rng.uniform(0.01, 0.2)
    req = G.GenerateRequest(request_id=rid, sampling=s, stopping=st, stream=rng.random() < 0.8)
    if rng.random() < 0.2:
        req.token_ids.ids.extend(words)
    else:
        req.text = " ".join(map(str, words))
    roll = rng.random()
    plan = {
        "cancel_after": rng.randint(1, 4) if req.stream and roll < 0.04 else None,
        "abort_after": 1 if req.stream and 0.04 <= roll < 0.07 else None,
    }
    return req, plan


def check_final(req: G.GenerateRequest, last: Any, n_tokens: int) -> str:
    """What is wrong with a finished request's answer ('' when nothing)."""
    st = req.stopping
    reason = FINISH.get(last.finish_reason, "?")
    if last.usage.completion_tokens != n_tokens:
        return f"usage says {last.usage.completion_tokens} tokens, {n_tokens} arrived"
    if reason == "max_tokens" and n_tokens != st.max_new_tokens:
        return f"max_tokens after {n_tokens} of {st.max_new_tokens}"
    if n_tokens > st.max_new_tokens:
        return f"{n_tokens} tokens > max_new_tokens {st.max_new_tokens}"
    if reason == "error":
        return f"finish reason ERROR: {last.error.message}"
    if reason == "cancelled":
        return "cancelled by the server"
    return ""


def one_request(stubs: Stubs, req: G.GenerateRequest, plan: dict[str, Any], timeout: float) -> Outcome:
    t0 = time.perf_counter()
    ttft, n, last = None, 0, None
    call = stubs.gen.Generate(req, timeout=timeout)
    try:
        for m in call:
            if m.token_ids and ttft is None and req.stream:  # unary calls answer once, at the end
                ttft = time.perf_counter() - t0
            n += len(m.token_ids)
            last = m
            if plan["cancel_after"] is not None and n >= plan["cancel_after"] and not m.finish_reason:
                call.cancel()
            if plan["abort_after"] is not None and n >= plan["abort_after"] and not m.finish_reason:
                stubs.gen.Abort(G.AbortRequest(request_ids=[req.request_id]), timeout=10)
                plan["abort_after"], plan["aborted"] = None, True
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.CANCELLED and plan["cancel_after"] is not None:
            return Outcome("CLIENT_CANCELLED", ttft, time.perf_counter() - t0, n)
        return Outcome(
            code.name,
            ttft,
            time.perf_counter() - t0,
            n,
            "" if code.name in INTENDED else f"{code.name}: {exc.details()}",
        )
    dt = time.perf_counter() - t0
    if last is None or not last.finish_reason:
        return Outcome("NO_FINAL_MESSAGE", ttft, dt, n, "the stream ended without a final message")
    reason = FINISH[last.finish_reason]
    if reason == "cancelled" and plan.get("aborted"):
        reason = "cancelled_by_own_abort"
    problem = "" if reason == "cancelled_by_own_abort" else check_final(req, last, n)
    return Outcome(reason, ttft, dt, n, problem)


def scrape_gpu(metrics_port: int | None) -> dict[str, float]:
    if metrics_port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("zostream_gpu_memory_bytes{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = float(line.rsplit(" ", 1)[1])
    return out


def sampler(pid: int | None, metrics_port: int | None, t0: float, stop: threading.Event, out: dict) -> None:
    while not stop.wait(1.0):
        t = time.monotonic() - t0
        if pid is not None:
            out["rss"].append((t, rss_bytes(pid)))
        gpu = scrape_gpu(metrics_port)
        if "allocated" in gpu:
            out["gpu"].append((t, gpu["allocated"]))


def memory_figures(samples: list[tuple[float, float]], warm: float) -> dict[str, Any]:
    after = [(t, v) for t, v in samples if t >= warm] or samples
    if not after:
        return {}
    mib = 2**20
    return {
        "samples": len(samples),
        "start_mib": round(samples[0][1] / mib, 1),
        "after_warmup_mib": round(after[0][1] / mib, 1),
        "end_mib": round(after[-1][1] / mib, 1),
        "max_mib": round(max(v for _, v in samples) / mib, 1),
        "growth_after_warmup_mib": round((after[-1][1] - after[0][1]) / mib, 1),
        "slope_mib_per_min": round(slope_per_minute([(t, v / mib) for t, v in after]), 3),
    }


def admission_probes(stubs: Stubs, max_seq: int, max_new: int, burst: int, timeout: float) -> dict[str, Any]:
    """A request that can never fit is refused at once with a message; a burst past the queue gets
    RESOURCE_EXHAUSTED quickly and every other request of it completes (nothing hangs)."""
    out: dict[str, Any] = {}
    never = [
        ("prompt + max_new_tokens > max_seq_len", " ".join(["7"] * (max_seq - 4)), min(64, max_new)),
        ("max_new_tokens > server limit", "5 6", max_new + 1),
    ]
    for name, text, n in never:
        t0 = time.perf_counter()
        try:
            list(
                stubs.gen.Generate(
                    G.GenerateRequest(text=text, stopping=G.StoppingCriteria(max_new_tokens=n)),
                    timeout=timeout,
                )
            )
            out[name] = {"code": "OK", "seconds": time.perf_counter() - t0}
        except grpc.RpcError as exc:
            out[name] = {
                "code": exc.code().name,
                "message": exc.details(),
                "seconds": time.perf_counter() - t0,
            }
    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def long_one(i: int) -> None:
        req = G.GenerateRequest(
            text=f"{i % 90 + 1} 3",
            stream=True,
            stopping=G.StoppingCriteria(max_new_tokens=min(48, max_new), ignore_eos=True),
        )
        t0 = time.perf_counter()
        try:
            n = sum(len(m.token_ids) for m in stubs.gen.Generate(req, timeout=timeout))
            code = "OK" if n == req.stopping.max_new_tokens else f"SHORT:{n}"
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            results.append((code, time.perf_counter() - t0))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=long_one, args=(i,), daemon=True) for i in range(burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    codes = Counter(c for c, _ in results)
    exhausted = [s for c, s in results if c == "RESOURCE_EXHAUSTED"]
    out["burst"] = {
        "requests": burst,
        "answered": len(results),
        "hung": burst - len(results),
        "codes": dict(codes),
        "resource_exhausted_p99_seconds": percentile(exhausted, 99),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="zostream-load-"))
    server: ServerProc | None = None
    metrics_port = None
    pid = args.server_pid
    try:
        if args.target:
            channel = grpc.insecure_channel(args.target)
        else:
            model = Path(args.model) if args.model else tiny_model(work / "models")
            metrics_port = free_port()
            extra = (
                "--max-batch",
                str(args.max_batch),
                "--max-waiting",
                str(args.max_waiting),
                "--max-seq-len",
                str(args.max_seq_len),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--threads",
                str(args.threads),
                "--metrics-port",
                str(metrics_port),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            )
            server = ServerProc(model, work / "data", work, extra).start()
            channel, pid = server.channel, server.proc.pid  # type: ignore[union-attr]
        stubs = Stubs(channel)
        info = stubs.gen.GetModelInfo(G.GetModelInfoRequest(), timeout=30)
        job_id = start_job(stubs) if args.job == "lora" else None
        job_steps0 = job_steps(stubs, job_id)
        tally = Tally()
        samples: dict[str, list] = {"rss": [], "gpu": []}
        t0 = time.monotonic()
        end = t0 + args.duration
        stop = threading.Event()
        mon = threading.Thread(target=sampler, args=(pid, metrics_port, t0, stop, samples), daemon=True)
        mon.start()

        def worker(w: int) -> None:
            rng = random.Random(args.seed * 100_003 + w)
            k = 0
            while time.monotonic() < end:
                req, plan = random_request(rng, f"w{w}-{k}", info.max_sequence_length)
                k += 1
                o = one_request(stubs, req, plan, args.request_timeout)
                tally.add(o)
                if o.outcome == "RESOURCE_EXHAUSTED":
                    time.sleep(0.05)

        workers = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.streams)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(args.duration + args.request_timeout + 30)
        load_seconds = time.monotonic() - t0
        hung_workers = sum(t.is_alive() for t in workers)
        job_steps1 = job_steps(stubs, job_id)
        job_status = job_state(stubs, job_id)
        probes = admission_probes(
            stubs, info.max_sequence_length, info.max_new_tokens, args.burst, args.request_timeout
        )
        after = stubs.gen.Generate(
            G.GenerateRequest(
                text="5 17 3 42", stopping=G.StoppingCriteria(max_new_tokens=4, ignore_eos=True)
            ),
            timeout=30,
        )
        after_ok = sum(len(m.token_ids) for m in after) == 4
        if job_id:
            stubs.ft.CancelJob(F.CancelJobRequest(job_id=job_id), timeout=30)
        stop.set()
        mon.join(5)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    outs = tally.outcomes
    done = [o for o in outs if not o.outcome.isupper()]
    ttfts = [o.ttft for o in outs if o.ttft is not None]
    tokens = sum(o.tokens for o in outs)
    warm = min(30.0, 0.1 * args.duration)
    figures = {
        "streams": args.streams,
        "duration_seconds": round(load_seconds, 1),
        "device": info.device,
        "model": info.model_id,
        "requests": len(outs),
        "requests_finished": len(done),
        "outcomes": dict(Counter(o.outcome for o in outs)),
        "errors": len(tally.errors),
        "error_examples": sorted(set(tally.errors))[:10],
        "hung_workers": hung_workers,
        "ttft_p50_ms": round(1e3 * (percentile(ttfts, 50) or 0), 2),
        "ttft_p99_ms": round(1e3 * (percentile(ttfts, 99) or 0), 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / load_seconds, 1),
        "requests_per_second": round(len(outs) / load_seconds, 2),
        "rss": memory_figures(samples["rss"], warm),
        "gpu_allocated": memory_figures(samples["gpu"], warm),
        "job": {
            "id": job_id,
            "steps_during_load": (job_steps1 - job_steps0) if job_id else 0,
            "status_at_end": job_status,
        },
        "admission": probes,
        "serves_after": after_ok,
    }
    b = probes["burst"]
    figures["ok"] = bool(
        figures["errors"] == 0
        and hung_workers == 0
        and b["hung"] == 0
        and after_ok
        and set(b["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
        and all(p["code"] == "INVALID_ARGUMENT" for k, p in probes.items() if k != "burst")
        and (job_id is None or job_status == "JOB_STATUS_RUNNING")
    )
    return figures


def start_job(stubs: Stubs) -> str:
    lines = [{"text": " ".join(str((i * 7 + j * 3) % 90 + 1) for j in range(16))} for i in range(64)]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    stubs.ft.UploadDataset(
        iter(
            [
                F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="load", overwrite=True)),
                F.UploadDatasetRequest(chunk=data),
            ]
        ),
        timeout=30,
    )
    hp = F.Hyperparameters(
        steps=10_000_000,
        learning_rate=1e-3,
        eps=1e-2,
        batch_size=4,
        seed=1,
        max_len=64,
        checkpoint_every=50,
        lora=Cm.LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
    )
    job = stubs.ft.CreateJob(
        F.CreateJobRequest(method=Cm.TUNING_METHOD_LORA, training_dataset="load", hyperparameters=hp),
        timeout=30,
    )
    deadline = time.monotonic() + 60
    while job_steps(stubs, job.id) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return job.id


def job_steps(stubs: Stubs, job_id: str | None) -> int:
    return stubs.ft.GetJob(F.GetJobRequest(job_id=job_id), timeout=10).progress.steps_done if job_id else 0


def job_state(stubs: Stubs, job_id: str | None) -> str:
    return (
        F.JobStatus.Name(stubs.ft.GetJob(F.GetJobRequest(job_id=job_id), timeout=10).status) if job_id else ""
    )


def summary(f: dict[str, Any]) -> str:
    rss, gpu, b = f["rss"], f["gpu_allocated"], f["admission"]["burst"]
    rows: list[tuple[str, Any]] = [
        ("all held", f["ok"]),
        ("concurrent streams held / duration (s)", f"{f['streams']} / {f['duration_seconds']}"),
        ("device, model", f"{f['device']}, {f['model']}"),
        ("requests (finished normally)", f"{f['requests']} ({f['requests_finished']})"),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(f["outcomes"].items()))),
        ("errors other than RESOURCE_EXHAUSTED / own cancels", f["errors"]),
        ("TTFT p50 / p99 (ms)", f"{f['ttft_p50_ms']} / {f['ttft_p99_ms']}"),
        ("tokens/s (all streams)", f["tokens_per_second"]),
        (
            "LoRA job steps during the load, status at end",
            f"{f['job']['steps_during_load']}, {f['job']['status_at_end']}",
        ),
    ]
    if rss:
        rows.append(
            (
                "server RSS MiB: start / after warm-up / end / max",
                f"{rss['start_mib']} / {rss['after_warmup_mib']} / {rss['end_mib']} / {rss['max_mib']}",
            )
        )
        rows.append(("RSS slope after warm-up (MiB/min)", rss["slope_mib_per_min"]))
    if gpu:
        rows.append(
            (
                "GPU allocated MiB: after warm-up / end / max",
                f"{gpu['after_warmup_mib']} / {gpu['end_mib']} / {gpu['max_mib']}",
            )
        )
    for k, p in f["admission"].items():
        if k != "burst":
            rows.append((f"never fits: {k}", f"{p['code']} in {p['seconds'] * 1e3:.0f} ms"))
    rows.append(
        (
            "burst: requests / codes / hung",
            f"{b['requests']} / {', '.join(f'{k} {v}' for k, v in sorted(b['codes'].items()))} / {b['hung']}",
        )
    )
    rows.append(("burst: RESOURCE_EXHAUSTED p99 (s)", b["resource_exhausted_p99_seconds"]))
    return "## Load (stress/load.py)\n\n" + markdown_table(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stress.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument(
        "--job", choices=("lora", "none"), default="lora", help="a LoRA job trains during the load"
    )
    p.add_argument("--burst", type=int, default=160, help="requests of the admission burst")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=60.0, help="deadline of every request (s)")
    p.add_argument("--target", default=None, help="HOST:PORT of a running server (default: start one)")
    p.add_argument("--server-pid", type=int, default=None, help="with --target: its pid, for RSS")
    p.add_argument("--model", default=None, help="model dir for the started server (default: the tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-waiting", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if not (1 <= args.streams <= 1024 and 0 < args.duration <= 7200 and 0 <= args.burst <= 4096):
        p.error("bounds: 1 <= --streams <= 1024, 0 < --duration <= 7200, 0 <= --burst <= 4096")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fig = run(args)
    report(fig, summary(fig), args.json_out)
    return 0 if fig["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
