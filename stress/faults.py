"""Fault injector: kill -9 the server at random points of a full-parameter job and a LoRA job, restart it
each time, and show that nothing is lost: the final update log and exported weights of each job equal,
byte for byte, those of the same jobs run uninterrupted.

    python -m stress.faults --kills 20 --seed 0 --json-out faults.json

Each kill is one of (chosen at random, each kind at least once when there are enough kills):
  signal      SIGKILL from outside once the job has logged 1-2 more steps, plus a random sub-step delay
  bitflip     the same, then one random bit of the last logged record is flipped while the server is down
  log_write   step S's records written, not fsync'd         (stress/serve.py hooks, the process kills itself)
  log_torn    part of step S's records written (torn tail)
  pass        the pass of step S at block B
  apply       half-way through writing step S into the K-th weight group (the working copy for full)
  event_torn  half of a "step" event line written
  checkpoint  a LoRA checkpoint half written
  export      the job's export half written (always the job's last kill)
A greedy Generate after a restart must return the base model's tokens: before each outside kill, from a
start of its own that trains nothing; before an armed fault, unless the fault fires first. At the end,
for each job: events numbered 1..n with no gap, one "resumed" per kill that hit it running, one
"log_repaired" per torn or flipped tail, one "succeeded"; update.log and the exported files bitwise
equal to the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from stress.common import ServerProc, markdown_table, report, tiny_model
from zostream.engine.update_log import UpdateLog
from zostream.engine.update_log_tools import verify
from zostream.v1 import common_pb2 as Cm
from zostream.v1 import finetuning_pb2 as F
from zostream.v1 import generation_pb2 as G

KINDS = ("signal", "bitflip", "log_write", "log_torn", "pass", "apply", "event_torn")
NUM_LAYERS = 3  # the tiny model's blocks (groups: outer + 3 blocks)
NO_JOB = "none"  # stress/serve.py --only-job with no such job: a start that trains nothing


@dataclass
class Kill:
    job: str  # "full" | "lora"
    kind: str
    fault: str | None  # the --fault spec, None for kills from outside
    logged_before: int  # intact steps in update.log when the server was started
    logged_after: int  # intact steps right after the kill (before any repair)
    exit_code: int | None
    fired: bool
    seconds: float  # start of the server to its death
    note: str = ""


def dataset() -> bytes:
    lines = [{"text": " ".join(str((i * 7 + j * 3 + 5) % 90 + 1) for j in range(16))} for i in range(32)]
    return "\n".join(json.dumps(x) for x in lines).encode()


def job_request(method: str, steps: int) -> F.CreateJobRequest:
    full = method == "full"
    hp = F.Hyperparameters(
        steps=steps,
        learning_rate=1e-3 if full else 0.05,
        eps=1e-2 if full else 0.05,
        batch_size=4,
        seed=11 if full else 12,
        checkpoint_every=4,
        max_len=64,
        lora=Cm.LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
    )
    m = Cm.TUNING_METHOD_FULL if full else Cm.TUNING_METHOD_LORA
    return F.CreateJobRequest(method=m, training_dataset="faults", hyperparameters=hp, display_name=method)


def upload(stubs: Any) -> None:
    parts = [
        F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="faults", overwrite=True)),
        F.UploadDatasetRequest(chunk=dataset()),
    ]
    stubs.ft.UploadDataset(iter(parts), timeout=30)


def greedy(stubs: Any) -> list[int]:
    req = G.GenerateRequest(
        text="5 17 3 42",
        sampling=G.SamplingParams(temperature=0.0),
        stopping=G.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
    )
    return [t for m in stubs.gen.Generate(req, timeout=30) for t in m.token_ids]


def logged(job_dir: Path) -> int:
    p = job_dir / "update.log"
    return verify(p).steps if p.exists() else 0


def status(job_dir: Path) -> str:
    return json.loads((job_dir / "status.json").read_text())["status"]


def wait_logged(job_dir: Path, step: int, timeout: float, alive: Callable[[], bool]) -> None:
    """Until the job has logged `step` steps, has ended, the server has exited, or `timeout` seconds pass.
    Reads the job's files only: a restarted server queues the job again and trains it before a gRPC
    channel's reconnect backoff would even see it SERVING (the tiny job can finish in that time)."""
    end = time.monotonic() + timeout
    while (
        logged(job_dir) < step
        and status(job_dir) in ("queued", "running")
        and alive()
        and time.monotonic() < end
    ):
        time.sleep(0.005)


def digest(path: Path) -> str:
    """sha256 of a file's bytes; for safetensors, of its header with sorted keys + every tensor byte (the
    library writes the metadata map in a random order, so two saves of equal tensors differ in bytes)."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        n = struct.unpack_from("<Q", data)[0]
        header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True).encode()
        data = header + data[8 + n :]
    return hashlib.sha256(data).hexdigest()


def outputs(job_dir: Path) -> dict[str, str]:
    """Digests of update.log and of every exported file (model/ for full, adapter/ for LoRA)."""
    out = {"update.log": digest(job_dir / "update.log")}
    for sub in ("model", "adapter"):
        for p in sorted((job_dir / sub).glob("*")) if (job_dir / sub).exists() else []:
            out[f"{sub}/{p.name}"] = digest(p)
    return out


def wait_terminal(stubs: Any, job_id: str, timeout: float) -> F.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = stubs.ft.GetJob(F.GetJobRequest(job_id=job_id), timeout=10)
        if job.status in (F.JOB_STATUS_SUCCEEDED, F.JOB_STATUS_FAILED, F.JOB_STATUS_CANCELLED):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout} s (status {job.status})")
        time.sleep(0.05)


def reference(model: Path, work: Path, steps: int, extra: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Both jobs uninterrupted on a fresh data dir: the bytes every faulty run must end with."""
    sp = ServerProc(model, work / "data", work, extra).start()
    try:
        s = sp.stubs()
        upload(s)
        ids = {m: s.ft.CreateJob(job_request(m, steps), timeout=10).id for m in ("full", "lora")}
        for m, jid in ids.items():
            job = wait_terminal(s, jid, 600)
            if job.status != F.JOB_STATUS_SUCCEEDED:
                raise RuntimeError(f"reference {m} job ended {job.status}: {job.error.message}")
    finally:
        sp.stop()
    return {m: outputs(work / "data" / "jobs" / jid) for m, jid in ids.items()}


def plan_kinds(method: str, kills: int, rng: random.Random, only: tuple[str, ...] = ()) -> list[str]:
    """`kills` kinds for one job: every kind in turn (shuffled), then the export's."""
    kinds = list(only or KINDS) + (["checkpoint"] if method == "lora" and not only else [])
    body = [kinds[i % len(kinds)] for i in range(max(0, kills - 1))]
    rng.shuffle(body)
    return [*body, "export"] if kills else []


def choose_fault(kind: str, n: int, steps: int, rng: random.Random) -> str | None:
    """The --fault spec for stress/serve.py; None for kills from outside (signal, bitflip)."""
    s = min(steps - 1, n + rng.randint(0, 2))
    if kind in ("log_write", "log_torn"):
        return f"{kind}:{s}"
    if kind == "pass":
        return f"pass:{s}:{rng.randrange(NUM_LAYERS)}"
    if kind == "apply":
        return f"apply:{s}:{rng.randint(1, NUM_LAYERS + 1)}"
    if kind == "event_torn":
        return f"event_torn:{s + 1}"
    if kind == "checkpoint":
        return "checkpoint:1"
    if kind == "export":
        return "export"
    return None


def flip_last_record(log: Path, rng: random.Random) -> str:
    with UpdateLog.open(log, repair=False) as lg:
        n = len(lg)
    data = bytearray(log.read_bytes())
    if n == 0:
        return "no record to flip"
    size = 20 if data[6:8] == b"\x03\x00" else 16  # format 3 records carry the step's loss; format 1 not
    bit = rng.randrange(8 * size)
    pos = len(data) - size + bit // 8  # plain logs: the last `size` bytes are the last record (q = 1)
    data[pos] ^= 1 << (bit % 8)
    log.write_bytes(bytes(data))
    return f"bit {bit % 8} of byte {bit // 8} of record {n - 1}"


def events(job_dir: Path) -> list[dict]:
    out = []
    for line in (job_dir / "events.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"id": None, "type": "<torn>"})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zostream-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "models")
    extra = ("--threads", "1")
    steps = args.steps or max(12, 5 * args.kills + 4)
    (work / "ref").mkdir(exist_ok=True)
    (work / "faulty").mkdir(exist_ok=True)
    t0 = time.monotonic()
    want = reference(model, work / "ref", steps, extra)
    ref_seconds = time.monotonic() - t0

    data = work / "faulty" / "data"
    sp = ServerProc(model, data, work / "faulty", extra).start()
    s = sp.stubs()
    upload(s)
    base_tokens = greedy(s)
    ids = {m: s.ft.CreateJob(job_request(m, steps), timeout=10).id for m in ("full", "lora")}
    sp.stop()
    only = tuple(k for k in (args.kinds or "").split(",") if k)
    plans = {m: plan_kinds(m, args.kills, rng, only) for m in ids}
    kills: list[Kill] = []
    served_ok = 0
    deadline = t_start + args.max_seconds
    for method, jid in ids.items():
        jdir = data / "jobs" / jid
        for kind in plans[method]:
            if time.monotonic() > deadline or status(jdir) in ("succeeded", "failed", "cancelled"):
                break
            n = logged(jdir)
            if steps - n < 3:  # nearly done: the last kill is the export's
                kind = "export"
            fault = choose_fault(kind, n, steps, rng)
            t0 = time.monotonic()
            note = ""
            if fault is None:
                # The tiny job can run to its end during one Generate: check the restarted server's answer
                # in a start of its own that trains nothing (the data dir as the last kill left it).
                sp.start(only_job=NO_JOB)
                tokens = greedy(sp.stubs())
                if tokens != base_tokens:
                    raise AssertionError(f"after restart {sp.starts} the base model answers {tokens}")
                served_ok += 1
                sp.stop()
            sp.start(fault, wait=False, only_job=jid)  # the other job stays queued: it cannot run ahead
            if fault is None:  # signal / bitflip: SIGKILL from outside once it has trained 1-2 more steps
                wait_logged(jdir, min(steps - 2, n + rng.randint(1, 2)), args.round_timeout, sp.alive)
                time.sleep(rng.uniform(0, 0.02))  # within a step of the tiny model
                fired = status(jdir) == "running"
                code = sp.kill9()
            else:
                try:  # one greedy Generate; the armed fault may fire first (the job resumes at once)
                    sp.wait_serving()
                    tokens = greedy(sp.stubs())
                    if tokens != base_tokens:
                        raise AssertionError(
                            f"after restart {sp.starts} the base model answers {tokens}, not {base_tokens}"
                        )
                    served_ok += 1
                except (RuntimeError, grpc.RpcError):
                    if sp.wait_exit(10) != -9:
                        raise
                code = sp.wait_exit(args.round_timeout)
                fired = code == -9
                if code is None:
                    code = sp.kill9()
                    note = "the fault did not fire in time; killed from outside"
            after = logged(jdir)
            if kind == "bitflip" and fired:
                note = flip_last_record(jdir / "update.log", rng)
            kills.append(Kill(method, kind, fault, n, after, code, fired, time.monotonic() - t0, note))
            if args.verbose:
                print(
                    f"kill {len(kills)}: {method} {kind} {fault or ''} steps {n} -> {after} rc {code} {note}",
                    flush=True,
                )
            if kind == "export":
                break
        # No kills left for this job: run it to the end (a clean SIGTERM stop afterwards, but the last).
        if status(jdir) not in ("succeeded", "failed", "cancelled"):
            sp.start(only_job=jid)
            wait_terminal(sp.stubs(), jid, args.round_timeout * 4)
            if method != list(ids)[-1]:
                sp.stop()
    if not sp.alive():
        sp.start()  # a last clean start: both jobs are finished and the server still answers
    final = {m: sp.stubs().ft.GetJob(F.GetJobRequest(job_id=jid), timeout=10) for m, jid in ids.items()}
    sp.stop()

    jobs_out: dict[str, Any] = {}
    for method, jid in ids.items():
        jdir = data / "jobs" / jid
        evs = events(jdir)
        types = [e["type"] for e in evs]
        mine = [k for k in kills if k.job == method and k.fired]
        got = outputs(jdir)
        jobs_out[method] = {
            "job_id": jid,
            "status": F.JobStatus.Name(final[method].status),
            "error": final[method].error.message,
            "steps": final[method].progress.steps_done,
            "kills_fired": len(mine),
            "events": len(evs),
            "event_ids_contiguous": [e["id"] for e in evs] == list(range(1, len(evs) + 1)),
            "resumed_events": types.count("resumed"),
            "log_repaired_events": types.count("log_repaired"),
            "torn_or_flipped_tails": sum(k.kind in ("log_torn", "bitflip") for k in mine),
            "succeeded_events": types.count("succeeded"),
            "last_event": types[-1] if types else None,
            "update_log_bytes": (jdir / "update.log").stat().st_size,
            "update_log_equal": got.get("update.log") == want[method]["update.log"],
            "exports_equal": got == want[method],
            "files_compared": sorted(want[method]),
            "sha256_update_log": got.get("update.log"),
        }
    by_kind: dict[str, int] = {}
    for k in kills:
        by_kind[k.kind] = by_kind.get(k.kind, 0) + int(k.fired)
    ok = all(
        j["exports_equal"]
        and j["event_ids_contiguous"]
        and j["status"] == "JOB_STATUS_SUCCEEDED"
        and j["succeeded_events"] == 1
        and j["log_repaired_events"] == j["torn_or_flipped_tails"]
        for j in jobs_out.values()
    )
    return {
        "ok": ok,
        "seed": args.seed,
        "steps_per_job": steps,
        "kills_planned_per_job": args.kills,
        "kills_fired": sum(k.fired for k in kills),
        "kills_by_kind": by_kind,
        "restarts": sp.starts,
        "restarts_serving_base_tokens": served_ok,
        "reference_seconds": round(ref_seconds, 1),
        "seconds": round(time.monotonic() - t_start, 1),
        "jobs": jobs_out,
        "kills": [asdict(k) for k in kills],
        "workdir": str(work),
    }


def summary(fig: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("all held", fig["ok"]),
        ("kills fired (planned per job)", f"{fig['kills_fired']} ({fig['kills_planned_per_job']})"),
        ("kills by kind", ", ".join(f"{k} {v}" for k, v in sorted(fig["kills_by_kind"].items()))),
        (
            "server starts / serving base tokens after restart",
            f"{fig['restarts']} / {fig['restarts_serving_base_tokens']}",
        ),
        ("wall seconds (reference run)", f"{fig['seconds']} ({fig['reference_seconds']})"),
    ]
    for m, j in fig["jobs"].items():
        rows += [
            (f"{m}: status, steps", f"{j['status']}, {j['steps']}"),
            (f"{m}: kills survived / resumed events", f"{j['kills_fired']} / {j['resumed_events']}"),
            (
                f"{m}: torn or flipped tails / log_repaired events",
                f"{j['torn_or_flipped_tails']} / {j['log_repaired_events']}",
            ),
            (f"{m}: update.log bitwise equal ({j['update_log_bytes']} bytes)", j["update_log_equal"]),
            (
                f"{m}: exported files bitwise equal",
                f"{j['exports_equal']} ({', '.join(j['files_compared'])})",
            ),
            (f"{m}: events 1..n without a gap ({j['events']})", j["event_ids_contiguous"]),
        ]
    return "## Faults (stress/faults.py)\n\n" + markdown_table(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stress.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kill -9 points per job (default 20)")
    p.add_argument("--steps", type=int, default=0, help="steps per job (default max(12, 5 * kills + 4))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kinds", default="", help=f"comma list of kill kinds to cycle (default all: {', '.join(KINDS)})"
    )
    p.add_argument("--round-timeout", type=float, default=120.0, help="seconds one faulty server may run")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop injecting after this long")
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temp dir, removed)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.kills <= 200:
        p.error("--kills must be in 0..200")
    unknown = set(filter(None, args.kinds.split(","))) - set(KINDS) - {"checkpoint", "export"}
    if unknown:
        p.error(f"--kinds: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        fig = run(args)
    except grpc.RpcError as exc:
        raise SystemExit(f"an RPC failed: {exc.code()} {exc.details()}") from None
    report(fig, summary(fig), args.json_out)
    if args.workdir is None:
        shutil.rmtree(fig["workdir"], ignore_errors=True)
    return 0 if fig["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
