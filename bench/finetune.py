"""Held-out accuracy against forward passes: zostream's ZO estimators × losses, and the peer.

For each task (bench/sentiment_task.py, bench/topic_task.py), run and seed, a job trains for
--forwards batch forwards with DEFAULT hyperparameters (no lr / eps flags: what a new user gets) and is
evaluated on the held-out set every --evals-th of the budget. Runs:

  default          no estimator / loss flags: grzo (one ± pair of forwards per step, the batch in q = 4
                   groups each on its own direction, steps normalised by the RMS of the groups' loss
                   differences, lr 1e-2 (LoRA) / 2e-3 (full) with a cosine decay), cross-entropy over
                   the candidates
  grzo-tokens      the default's estimator on the answer's token NLL over the whole vocabulary
  fzoo-candidates  FZOO (q=4 one-sided directions + one shared unperturbed pass, steps normalised by
                   the spread of their losses), cross-entropy over the candidates
  mezo-candidates  MeZO SPSA (q=1 ± pair) on the candidate loss, its default lr/eps
  fzoo-tokens      FZOO on the answer's token NLL over the whole vocabulary
  mezo-tokens      MeZO on token NLL: what every job ran before there was a choice
  peer             plain MeZO-LoRA on transformers + peft (fp32, torch.manual_seed noise, candidates CE),
                   lr 1e-3, eps 1e-2: the loop of the MeZO paper, in this script
  peer-all-linear  the same loop with PEFT's target_modules="all-linear" (every linear layer of the blocks)
                   instead of MeZO's q_proj, v_proj
  peer-mlp         the same loop on the MLP projections alone (gate_proj, up_proj, down_proj)

A forward is one pass of the batch (B records); a grzo or MeZO step costs 2, an FZOO step q+1. Output: a table
per task in RESULTS-form (printed, and appended to --results), a JSON of every curve, and a PNG plot.

A job scores the held-out set in its compute dtype (bf16 for the demo model; float32 on a CPU without bf16
kernels), the peer in fp32. The scoring precision moves a four-label task's accuracy by 0.01-0.03
(bench/RESULTS.md): --score-dtype float32 scores every evaluated checkpoint of the engine's jobs again in fp32
(rebuilt from the update log: `zostream log export --upto K`, then `zostream eval --dtype float32`), for a
comparison at equal scoring precision. Only the accuracy is rescored (the job's own stays in the curve as
accuracy_job); the candidate CE column is the job's.

  python bench/finetune.py --model DIR --out DIR [--method lora] [--seeds 0,1,2] [--forwards 1200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RUNS = (
    "default",
    "grzo-tokens",
    "fzoo-candidates",
    "mezo-candidates",
    "fzoo-tokens",
    "mezo-tokens",
    "peer",
    "peer-all-linear",
    "peer-mlp",
)
TASKS = {"sentiment": "bench/sentiment_task.py", "topic": "bench/topic_task.py"}
PEER_LR, PEER_EPS = 1e-3, 1e-2
PEER_TARGETS = {
    "peer": ["q_proj", "v_proj"],
    "peer-all-linear": "all-linear",
    "peer-mlp": ["gate_proj", "up_proj", "down_proj"],
}  # PEFT's target_modules


def forwards_per_step(run: str) -> int:
    """fzoo: q=4 directions + θ; grzo, mezo, peer: one ± pair. The default is grzo for LoRA and full."""
    return 5 if run.startswith("fzoo") else 2


def make_task(task: str, out: Path, n_train: int, n_eval: int) -> Path:
    d = out / "tasks" / task
    if not (d / "eval.jsonl").exists():
        here = Path(__file__).resolve().parent
        script = here / Path(TASKS[task]).name
        subprocess.run(
            [sys.executable, str(script), str(d), "--train", str(n_train), "--eval", str(n_eval)], check=True
        )
    return d


def run_engine(a: argparse.Namespace, task_dir: Path, run: str, seed: int, job: Path) -> list[dict]:
    """(forwards, accuracy, candidate loss) at every evaluation of a `zostream train` job."""
    estimator, loss = run.split("-") if run != "default" else ("auto", "auto")
    per = forwards_per_step(run)
    steps = a.forwards // per
    every = max(1, steps // a.evals)
    cmd = [sys.executable, "-m", "zostream", "train", "--model", a.model, "--method", a.method]
    cmd += ["--data", str(task_dir / "train.jsonl"), "--eval", str(task_dir / "eval.jsonl")]
    cmd += ["--out", str(job), "--steps", str(steps), "--batch-size", str(a.batch), "--seed", str(seed)]
    cmd += ["--eval-every", str(every), "--device", "cpu"]
    if run != "default":
        cmd += ["--estimator", estimator, "--loss", loss]
    cmd += ["--eval-batch-size", "32", "--json"]
    if estimator == "mezo":
        cmd += ["--q", "1"]
    if not (job / "adapter").exists() and not (job / "model").exists():
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        log(f"{run} seed {seed}: {time.monotonic() - t0:.0f} s")
    rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = {r["step"]: r for r in rows if r.get("type") == "eval"}  # the latest line per step
    steps_rows = [r for r in rows if r.get("type") == "step"]
    diverged = any(r.get("skipped") for r in steps_rows)
    points = [
        {
            "forwards": s * per,
            "accuracy": r.get("accuracy"),
            "candidate_loss": r.get("candidate_loss"),
            "skipped": diverged,
        }
        for s, r in sorted(evals.items())
    ]
    if a.score_dtype != "job":
        for s, point in zip(sorted(evals), points, strict=True):
            point["accuracy_job"] = point["accuracy"]  # the job's own score, in its compute dtype
            scored = rescore(a.model, a.method, job, s, task_dir / "eval.jsonl", a.score_dtype)
            point["accuracy"] = scored["accuracy"]
    return points


def rescore(model: str, method: str, job: Path, step: int, data: Path, dtype: str) -> dict:
    """`zostream eval --json` (accuracy, loss) of the job's checkpoint after `step` steps, scored in `dtype`:
    the checkpoint is rebuilt from the update log (what training produced, bit for bit) into job/rescore/."""
    out = job / "rescore" / str(step)
    zs = [sys.executable, "-m", "zostream"]
    export = [*zs, "log", "export", "--base", model, "--out", str(out), "--upto", str(step)]
    subprocess.run([*export, "--json", str(job / "update.log")], check=True, stdout=subprocess.DEVNULL)
    target = ["--model", model, "--adapter", str(out)] if method == "lora" else ["--model", str(out)]
    cmd = [*zs, "eval", *target, "--data", str(data), "--batch-size", "32", "--device", "cpu"]
    res = subprocess.run([*cmd, "--dtype", dtype, "--json"], check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


# ---------------------------------------------------------------------------------------------- peer


def run_peer(
    a: argparse.Namespace,
    task_dir: Path,
    seed: int,
    on_point: Callable[[list[dict]], None],
    targets: str | list[str],
) -> list[dict]:
    """MeZO-LoRA, the paper's loop: z from torch.manual_seed(step seed), θ ± εz in place, g·z update.

    targets: PEFT's target_modules (a list, or its "all-linear" shorthand). on_point(curve) runs after every
    evaluation, so a run cut short still leaves its points on disk."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, lc).eval()
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def encode(path: Path) -> list[tuple[list[int], list[int], int]]:
        out = []
        for line in path.read_text().splitlines():
            r = json.loads(line)
            cands = [tok(c, add_special_tokens=False)["input_ids"] for c in r["candidates"]]
            assert all(len(c) == 1 for c in cands), "the peer scores single-token candidates"
            out.append((tok(r["prompt"])["input_ids"], [c[0] for c in cands], r["answer"]))
        return out

    train, held = encode(task_dir / "train.jsonl"), encode(task_dir / "eval.jsonl")

    def cand_logp(batch) -> torch.Tensor:  # [B, K] log-softmax over the vocabulary at the answer slot
        t = max(len(p) for p, _, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(batch), t), pad)
        mask = torch.zeros(len(batch), t, dtype=torch.long)
        for i, (p, _, _) in enumerate(batch):
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
        # The decoder (LoRA inside) gives [B, T, H]; the vocabulary head runs on the answer slot only
        # ([B, H] -> [B, V]): the head over every position was ~0.5 of 2.3 CPU s per batch-16 forward.
        hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = torch.tensor([len(p) - 1 for p, _, _ in batch])
        logits = model.base_model.model.lm_head(hidden[torch.arange(len(batch)), last]).float()
        logp = torch.log_softmax(logits, -1)
        return torch.stack([logp[i, c] for i, (_, c, _) in enumerate(batch)])

    def loss(batch) -> float:
        lp = cand_logp(batch)
        return float(torch.nn.functional.cross_entropy(lp, torch.tensor([y for _, _, y in batch])))

    def evaluate() -> tuple[float, float]:
        """(accuracy, candidate cross-entropy) on the held-out set, as the engine's eval reports them."""
        hits, ce = 0, 0.0
        for i in range(0, len(held), 32):
            b = held[i : i + 32]
            lp, y = cand_logp(b), torch.tensor([y for _, _, y in b])
            hits += int((lp.argmax(1) == y).sum())
            ce += float(torch.nn.functional.cross_entropy(lp, y, reduction="sum"))
        return hits / len(held), ce / len(held)

    def perturb(step_seed: int, scale: float) -> None:
        torch.manual_seed(step_seed)
        for p in params:
            p.data.add_(torch.randn_like(p), alpha=scale)

    steps = a.forwards // 2
    every = max(1, steps // a.evals)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve = []
    t0 = time.monotonic()
    with torch.inference_mode():
        for step in range(steps + 1):
            if step % every == 0 or step == steps:
                acc, ce = evaluate()
                curve.append({"forwards": 2 * step, "accuracy": acc, "candidate_loss": ce})
                on_point(curve)
                log(f"peer seed {seed}: {2 * step} forwards, accuracy {acc:.3f}, candidate CE {ce:.3f}")
            if step == steps:
                break
            while len(order) < a.batch:
                order += torch.randperm(len(train), generator=gen).tolist()
            batch, order = [train[i] for i in order[: a.batch]], order[a.batch :]
            s = seed * 1_000_003 + step
            perturb(s, PEER_EPS)
            lp = loss(batch)
            perturb(s, -2 * PEER_EPS)
            lm = loss(batch)
            perturb(s, PEER_EPS)
            g = (lp - lm) / (2 * PEER_EPS)
            perturb(s, -PEER_LR * g)
    log(f"peer seed {seed}: {time.monotonic() - t0:.0f} s")
    return curve


# ---------------------------------------------------------------------------------------------- report


def at(curve: list[dict], forwards: int) -> float | None:
    """Accuracy of the last evaluation at or before `forwards`; None where the run stopped before it."""
    got = [c["accuracy"] for c in curve if c["forwards"] <= forwards and c["accuracy"] is not None]
    reached = max((c["forwards"] for c in curve), default=-1) >= forwards
    return got[-1] if got and reached else None


def table(task: str, curves: dict[str, dict[int, list[dict]]], budget: int) -> str:
    marks = sorted({budget // 4, budget // 2, budget})
    head = ["run", "seeds", "acc at 0", *(f"acc at {m}" for m in marks), f"min over seeds at {budget}"]
    lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, per_seed in curves.items():
        cells = [run, str(len(per_seed))]
        for m in [0, *marks]:
            vals = [v for v in (at(c, m) for c in per_seed.values()) if v is not None]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
        finals = [at(c, budget) for c in per_seed.values()]
        cells.append(f"{min(v for v in finals if v is not None):.3f}" if any(finals) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def points(task: str, curves: dict[str, dict[str, list[dict]]]) -> str:
    """Every evaluation of every seed: accuracy (held-out candidate CE) at each evaluated forward count."""
    xs = sorted({c["forwards"] for per_seed in curves.values() for cs in per_seed.values() for c in cs})
    lines = [f"#### {task}: every evaluation, accuracy (candidate CE)", ""]
    lines += ["| run | seed | " + " | ".join(str(x) for x in xs) + " |", "|---|---|" + "---|" * len(xs)]
    for run, per_seed in curves.items():
        for seed, cs in sorted(per_seed.items()):
            by = {c["forwards"]: c for c in cs}
            cells = []
            for x in xs:
                c = by.get(x)
                if c is None:
                    cells.append("-")
                    continue
                ce = c.get("candidate_loss")
                cells.append(f"{c['accuracy']:.3f}" + (f" ({ce:.2f})" if ce is not None else ""))
            lines.append(f"| {run} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(all_curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(all_curves), 2 if len(all_curves) == 4 else 3)  # four panels: a 2 x 2 grid
    rows = -(-len(all_curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(all_curves) :]:
        ax.set_visible(False)
    names = list(dict.fromkeys(run for curves in all_curves.values() for run in curves))
    colour = {run: f"C{i % 10}" for i, run in enumerate(names)}  # one colour per run in every panel
    for ax, (task, curves) in zip(axes.flat, all_curves.items(), strict=False):
        for run, per_seed in curves.items():
            xs = sorted({c["forwards"] for cs in per_seed.values() for c in cs})
            mean, lo, hi = [], [], []
            for x in xs:
                vals = [v for v in (at(cs, x) for cs in per_seed.values()) if v is not None]
                mean.append(sum(vals) / len(vals) if vals else math.nan)
                lo.append(min(vals, default=math.nan))
                hi.append(max(vals, default=math.nan))
            ax.plot(xs, mean, marker="o", color=colour[run], label=f"{run} (seeds: {len(per_seed)})")
            if len(per_seed) > 1:  # the band: lowest to highest seed
                ax.fill_between(xs, lo, hi, color=colour[run], alpha=0.15)
        ax.set_title(f"{task}: held-out accuracy (mean, band = seed range)")
        ax.set_ylim(0, 1)
        ax.set_xlabel("batch forwards")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def log(msg: str) -> None:
    print(f"[finetune] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (zostream model fetch-demo)")
    ap.add_argument("--out", required=True, type=Path, help="work dir: tasks, jobs, curves.json, plot")
    ap.add_argument("--method", default="lora", choices=("lora", "full"))
    ap.add_argument("--tasks", default="sentiment,topic")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--forwards", type=int, default=1200, help="batch forwards per job (default 1200)")
    ap.add_argument("--evals", type=int, default=6, help="evaluations per job besides step 0")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--results", type=Path, help="append the tables here (e.g. bench/RESULTS.md)")
    ap.add_argument(
        "--score-dtype",
        default="job",
        choices=("job", "float32", "bfloat16"),
        help="score the engine's checkpoints again in this dtype (default job: the job's own evaluation)",
    )
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="other --out dirs whose curves.json join this one's (runs split across processes); "
        "with --runs '' nothing runs: tables and plot of what is there",
    )
    ap.add_argument("--plot", type=Path, help="PNG path (default OUT/finetune.png)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    # {panel: {run: {seed: curve}}}; a panel is the task for LoRA jobs, "TASK (full)" for full-parameter ones
    all_curves: dict[str, dict[str, dict[str, list[dict]]]] = {}
    curves_path = a.out / "curves.json"
    for src in [*a.merge, a.out]:
        if (src / "curves.json").exists():
            for panel, runs in json.loads((src / "curves.json").read_text()).items():
                for run, per_seed in runs.items():
                    all_curves.setdefault(panel, {}).setdefault(run, {}).update(per_seed)
    curves_path.write_text(json.dumps(all_curves, indent=1))
    for task in a.tasks.split(",") if a.runs else []:
        task_dir = make_task(task, a.out, a.train, a.eval)
        curves = all_curves.setdefault(task if a.method == "lora" else f"{task} (full)", {})
        for run in a.runs.split(","):
            for seed in seeds:
                if str(seed) in curves.get(run, {}):
                    continue
                if run in PEER_TARGETS:
                    if a.method != "lora":
                        continue

                    def save(points: list[dict], curves: dict = curves, run: str = run, seed: int = seed):
                        curves.setdefault(run, {})[str(seed)] = points
                        curves_path.write_text(json.dumps(all_curves, indent=1))

                    curve = run_peer(a, task_dir, seed, save, PEER_TARGETS[run])
                else:
                    job = a.out / "jobs" / f"{task}-{a.method}-{run}-{seed}"
                    curve = run_engine(a, task_dir, run, seed, job)
                curves.setdefault(run, {})[str(seed)] = curve
                curves_path.write_text(json.dumps(all_curves, indent=1))
    # Panels in a fixed order: LoRA tasks, then full-parameter ones
    all_curves = {k: all_curves[k] for k in sorted(all_curves, key=lambda k: ("(full)" in k, k))}
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), "unknown CPU")
    head = (
        f"## Fine-tune: held-out accuracy vs forwards ({a.method}, batch {a.batch}, "
        "default hyperparameters)\n\n"
        f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} CPUs, model {Path(a.model).name}. Command: "
        f"`python bench/finetune.py --model MODEL --out OUT --method {a.method} --seeds {a.seeds} "
        f"--forwards {a.forwards} --tasks {a.tasks} --runs {a.runs} --score-dtype {a.score_dtype}`\n\n"
    )
    text = head + "\n".join(table(t, c, a.forwards) + "\n" + points(t, c) for t, c in all_curves.items())
    print(text)
    plot(all_curves, a.plot or a.out / "finetune.png")
    if a.results:
        with open(a.results, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
