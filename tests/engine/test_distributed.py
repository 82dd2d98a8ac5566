"""Data-parallel ZO (engine/distributed.py): 2 gloo ranks on 127.0.0.1 against a single process.

The reference for a W-rank run is a single process with the same global batch and micro-batch: its update
log must be byte-identical to every rank's. A killed rank must fail the survivor within the timeout with a
clear message, and a relaunch must finish the job with the log of an uninterrupted run. Ranks are real
processes (`zostream train` with torchrun's environment variables), so the CLI path is the one tested.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.tiny import make_tiny_model
from zostream.clients.cli import main
from zostream.engine import data as D
from zostream.engine.batching import batch_order
from zostream.engine.config import StreamConfig, ZOConfig
from zostream.engine.distributed import launch_env, micro_per_rank
from zostream.engine.finetune import open_trainer
from zostream.engine.forward import run_pass
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer
from zostream.engine.update_log import UpdateLog, read_header
from zostream.engine.update_log_format import LogHeader, Step
from zostream.engine.workloads import reduce_partials

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park and sat down on the grass",
    "hello there",
    "yes no maybe so",
    "the answer is four or maybe five",
    "paris is in france",
    "rome is in italy and the cat is in rome",
    "a dog",
    "so the park is in paris",
    "hello cat",
]
HYPER = [
    "--estimator",
    "mezo",
    "--lr",
    "1e-2",
    "--eps",
    "1e-2",
    "--max-len",
    "16",
    "--device",
    "cpu",
    "--json",
]
CPU = torch.device("cpu")
TIMEOUT_S = 5  # --dist-timeout of the launched ranks


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only cost time


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_tiny_model(tmp_path_factory.mktemp("models"), "llama")
    words = sorted({w for c in CORPUS for w in c.split()})
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps({"text": c}) + "\n" for c in CORPUS))  # 2..11 tokens: uneven padding
    return p


def train_argv(model: Path, data: Path, out: Path, method: str, steps: int, *extra: object) -> list[str]:
    argv = ["train", "--model", model, "--data", data, "--method", method, "--out", out, "--steps", steps]
    return [str(a) for a in [*argv, *HYPER, *extra]]


def run_single(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int = 2) -> list[subprocess.Popen[str]]:
    """`zostream train` as ranks 0..world-1, with the variables torchrun would set."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        code = "import sys; from zostream.clients.cli import main; sys.exit(main(sys.argv[1:]))"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


def header_size(log: Path) -> int:
    raw = log.read_bytes()
    return 12 + struct.unpack("<I", raw[8:12])[0] + 4  # magic+version+len | JSON | CRC32


# ---------------------------------------------------------------------------------------------- pure parts


def test_launch_env_reads_torchrun_variables():
    full = {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "LOCAL_RANK": "1",
    }
    env = launch_env(full)
    assert env is not None and (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 4, 1, 29500)
    assert launch_env({k: v for k, v in full.items() if k != "MASTER_ADDR"}) is None
    with pytest.raises(ValueError, match="RANK=4 must be in 0..WORLD_SIZE-1"):
        launch_env({**full, "RANK": "4"})
    with pytest.raises(ValueError, match="batch_size: 6 examples per step do not split into 4 ranks"):
        micro_per_rank(6, 1, 4)
    assert micro_per_rank(16, 2, 4) == 2


def test_cli_refuses_before_joining(capsys, monkeypatch, model, data, tmp_path):
    """--distributed outside torchrun, and a global batch that cannot be split over the ranks, are usage
    errors (exit 2) raised before this rank would wait for the others."""
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert main(train_argv(model, data, tmp_path / "a", "lora", 2, "--distributed")) == 2
    assert (
        "--distributed: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set" in capsys.readouterr().err
    )
    env = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(train_argv(model, data, tmp_path / "b", "lora", 2, "--batch-size", 4)) == 2
    assert (
        "--batch-size: the global batch of 4 examples does not split over 3 ranks" in capsys.readouterr().err
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reduction_is_left_to_right_then_one_division():
    # float64: (1e16 + 1) rounds back to 1e16; summed left to right the rows give exactly 1.0, a pairwise
    # (tree) sum gives 0.0 -- the order is part of the definition, so every rank must use this one.
    rows = torch.tensor([[1e16, 2.0, 3], [1.0, 2.0, 4], [-1e16, 2.0, 5], [1.0, 2.0, 6]], dtype=torch.float64)
    losses, tokens = reduce_partials(rows, q=1)
    assert tokens == 18
    assert losses == [(1.0 / 18, 8.0 / 18)]


def test_micro_batches_give_the_token_weighted_loss_of_the_batch(model, tmp_path):
    """Slices of the batch (over micro-batches and over ranks) cover batch_order's examples in order, and
    the micro-batched loss is the batch's token-weighted mean (not a mean of slice means)."""
    tok = PreTrainedTokenizerFast.from_pretrained(model)
    ds = D.load_records([json.dumps({"text": c}) for c in CORPUS], "mem", tok, 16)
    store = WeightStore(model)
    sc = StreamConfig()

    def trainer(job: str, micro: int | None):
        cfg = ZOConfig(method="lora", steps=2, batch_size=4, seed=3, eps=1e-2, micro_batch=micro)
        base = LayerStreamer(store, CPU, torch.float32, sc)
        return open_trainer(cfg, tmp_path / job, store, ds, 1, CPU, torch.float32, base, sc)

    whole, micro = trainer("whole", None), trainer("micro", 2)
    want = batch_order(len(ds.examples), 4, 3, 0)
    for world in (1, 2, 4):
        rows = []
        for r in range(world):
            micro.shard = (r, world)
            rows += [
                ids[b, : int(n)].tolist() for ids, _, lens in micro.batches(0) for b, n in enumerate(lens)
            ]
        assert rows == [list(ds.examples[i].input_ids) for i in want]
    micro.shard = (0, 1)
    results = []
    for tr in (whole, micro):
        wl = tr.workload()
        run_pass(tr.streamer, [wl])
        results.append((wl.losses(), wl.tokens))
    targets = sum(sum(t != D.IGNORE for t in ds.examples[i].labels[1:]) for i in want)
    assert results[0][1] == results[1][1] == targets
    (lp, lm), (mp, mm) = results[0][0][0], results[1][0][0]
    assert mp == pytest.approx(lp, rel=1e-6) and mm == pytest.approx(lm, rel=1e-6)
    whole.log.close()
    micro.log.close()


# ---------------------------------------------------------------------------------------------- 2 ranks

HEADER = LogHeader("fp", {"kind": "full"}, "gaussian", 1, "float32", "nearest", 1e-3, 0.0, [], 7)
WORKER = """
import json, os, sys, time
from pathlib import Path
import torch
from zostream.engine.distributed import Distributed, DistributedError, LaunchEnv
from zostream.engine.update_log import UpdateLog
from zostream.engine.update_log_format import LogHeader, Step

rank, port, tmp = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
env = LaunchEnv(rank, 2, rank, "127.0.0.1", port)
d = Distributed(env, timeout_s=1.5, startup_timeout_s=60, verify_every=2)
res = {}
path = tmp / f"rank{rank}.log"  # rank 1 was killed before it logged step 2
with UpdateLog.create(path, LogHeader.from_json(sys.argv[4].encode())) as log:
    for t in range(3 if rank == 0 else 2):
        log.append(Step(t, 0.25, (0.5 + t,)))
d.sync_log(path)
res["synced"] = path.read_bytes().hex()
rows = [[rank + 0.5, rank + 0.25, 10 + rank], [rank + 2.5, rank + 2.25, 20 + rank]]
rows = torch.tensor(rows, dtype=torch.float64)
d.stop_requested = rank == 1
res["gathered"] = d.reduce_losses(rows, 3).tolist()
res["stop"] = d.stop_agreed
with UpdateLog.open(path) as log:
    log.append(Step(3, 0.25, (1.0 + rank,)))  # the ranks disagree about step 3
try:
    d.verify_log(path, 4)
except DistributedError as e:
    res["diverged"] = str(e)
done = tmp / "rank0-done"
if rank == 1:  # silent: never enters the next exchange, stays alive until rank 0 gave up
    deadline = time.monotonic() + 30
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
else:
    t0 = time.monotonic()
    try:
        d.reduce_losses(rows, 4)
    except DistributedError as e:
        res["timeout"] = [str(e), time.monotonic() - t0]
    done.touch()
print(json.dumps(res), flush=True)
os._exit(0)
"""


def test_sync_exchange_divergence_and_silent_peer(tmp_path):
    """The Distributed API on 2 ranks: sync_log brings a rank that is a step behind up to date; the loss
    exchange returns rows in rank order and agrees on stopping; logs that differ fail every rank; a peer
    that stops answering fails the other after the timeout."""
    port, procs = free_port(), []
    for r in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(r), str(port), str(tmp_path), HEADER.to_json().decode()],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    res = []
    for rc, out, err in finish(procs, timeout=60):
        assert rc == 0, err
        res.append(json.loads(out.strip().splitlines()[-1]))
    with UpdateLog.create(tmp_path / "want.log", HEADER) as log:  # what rank 0 had before the sync
        for t in range(3):
            log.append(Step(t, 0.25, (0.5 + t,)))
    want = (tmp_path / "want.log").read_bytes().hex()
    assert res[0]["synced"] == res[1]["synced"] == want
    rows = [
        [0.5, 0.25, 10],
        [2.5, 2.25, 20],
        [1.5, 1.25, 11],
        [3.5, 3.25, 21],
    ]  # rank 0's rows, then rank 1's
    assert res[0]["gathered"] == res[1]["gathered"] == rows
    assert res[0]["stop"] and res[1]["stop"]  # rank 1 asked: both stop after this step
    for r in (0, 1):
        assert (
            "the update logs diverged by step 4: rank(s) 1 hold a log whose sha256 differs"
            in res[r]["diverged"]
        )
    msg, waited = res[0]["timeout"]
    assert "rank 1 stopped answering during the loss exchange at step 4 (no answer within the 1.5 s" in msg
    assert "its update log holds steps 0..3" in msg and "resumes from its last logged step" in msg
    assert 1.4 < waited < 15  # not before the 1.5 s timeout; the upper bound only proves no hang (loaded CI)


def test_two_ranks_write_the_single_process_log(capsys, model, data, tmp_path):
    """Full-parameter, q=2: both ranks' logs, rank 0's export and eval equal a single process with batch
    4 = 2 ranks x 2 run as two micro-batches of 2."""
    extra = ["--batch-size", 4, "--q", 2, "--eval", data, "--eval-every", 2]
    ref = run_single(capsys, train_argv(model, data, tmp_path / "ref", "full", 3, *extra, "--micro-batch", 2))
    res = finish(launch(train_argv(model, data, tmp_path / "dp", "full", 3, *extra)))
    assert [rc for rc, _, _ in res] == [0, 0], res[0][2][-2000:] + res[1][2][-2000:]
    assert res[1][1] == ""  # rank 0 alone prints the summary
    s = json.loads(res[0][1].strip().splitlines()[-1])
    want = (tmp_path / "ref" / "update.log").read_bytes()
    assert len(want) == header_size(tmp_path / "ref" / "update.log") + 3 * 2 * 20  # 20-byte records (v3)
    assert (tmp_path / "dp" / "update.log").read_bytes() == want
    assert (tmp_path / "dp" / "rank-1" / "update.log").read_bytes() == want
    model_file = "model/model.safetensors"
    assert (tmp_path / "dp" / model_file).read_bytes() == (tmp_path / "ref" / model_file).read_bytes()
    assert not (tmp_path / "dp" / "rank-1" / "model").exists()  # rank 0 owns the export
    assert (s["eval_loss"], s["final_train_loss"]) == (ref["eval_loss"], ref["final_train_loss"])
    # per step each rank sends its micro-batch's 2q NLL sums, its token count and a stop flag: float64 each
    assert (s["world_size"], s["micro_batch"], s["dist_payload_bytes_per_step"]) == (2, 2, 8 * (2 * 2 + 2))


def test_killed_rank_fails_the_other_and_relaunch_resumes(capsys, model, data, tmp_path):
    steps = 16
    argv = train_argv(
        model,
        data,
        tmp_path / "dp",
        "lora",
        steps,
        "--batch-size",
        4,
        "--dist-timeout",
        TIMEOUT_S,
        "--checkpoint-every",
        7,
    )
    procs = launch(argv)
    log1 = tmp_path / "dp" / "rank-1" / "update.log"
    deadline = time.monotonic() + 90
    per_step = 0  # bytes of one logged step: q records of 20 bytes (format 3), once the header is readable
    while not (per_step and log1.stat().st_size >= header_size(log1) + 3 * per_step):  # 3 steps logged
        if not per_step and log1.exists():
            with contextlib.suppress(ValueError):  # not yet written whole
                per_step = 20 * read_header(log1).q
        assert time.monotonic() < deadline and procs[0].poll() is None and procs[1].poll() is None
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    (rc, out, err), _ = finish(procs)
    waited = time.monotonic() - killed
    assert rc == 1 and out == "" and "Traceback" not in err
    assert "rank 1 stopped answering" in err and "resumes from its last logged step" in err
    # A closed connection fails at once, a silent peer after the timeout: the bound proves no hang, with room
    # for a loaded 2-core CI machine (rank 0 finishes its step and its error path first).
    assert waited < TIMEOUT_S + 30
    logged = len((tmp_path / "dp" / "update.log").read_bytes()) - header_size(log1)
    assert 3 <= logged // per_step < steps
    res = finish(launch(argv))  # the same command on both ranks resumes the job
    assert [rc for rc, _, _ in res] == [0, 0], res[0][2][-2000:] + res[1][2][-2000:]
    s = json.loads(res[0][1].strip().splitlines()[-1])
    assert s["steps"] == steps and 0 < s["resumed_from"] < steps
    assert s["dist_payload_bytes_per_step"] == 32 <= 64  # q=1: L+ sum, L- sum, tokens, stop flag
    ref = tmp_path / "ref"
    run_single(capsys, train_argv(model, data, ref, "lora", steps, "--batch-size", 4, "--micro-batch", 2))
    want = (ref / "update.log").read_bytes()
    assert (tmp_path / "dp" / "update.log").read_bytes() == want
    assert log1.read_bytes() == want
    got, want_t = (
        load_file(tmp_path / "dp" / "adapter/adapter_model.safetensors"),
        load_file(ref / "adapter/adapter_model.safetensors"),
    )
    assert got.keys() == want_t.keys() and all(torch.equal(got[k], want_t[k]) for k in got)


def test_two_ranks_full_parameter_grzo(capsys, model, data, tmp_path):
    """Full-parameter grzo, 2 groups of 2 over 2 ranks: each rank runs one group's micro-batch through its
    own direction, and both ranks write the log of a single process run with micro-batches of 2 (the data-
    parallel header records the per-rank slice; a single process cuts grzo's groups at the same edges)."""
    extra = ["--batch-size", 4, "--q", 2, "--estimator", "grzo"]
    run_single(capsys, train_argv(model, data, tmp_path / "ref", "full", 2, *extra, "--micro-batch", 2))
    res = finish(launch(train_argv(model, data, tmp_path / "dp", "full", 2, *extra)))
    assert [rc for rc, _, _ in res] == [0, 0], res[0][2][-2000:] + res[1][2][-2000:]
    want = (tmp_path / "ref" / "update.log").read_bytes()
    assert (tmp_path / "dp" / "update.log").read_bytes() == want
    assert (tmp_path / "dp" / "rank-1" / "update.log").read_bytes() == want
