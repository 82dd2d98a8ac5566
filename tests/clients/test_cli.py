"""The in-process CLI commands (generate, model info, train, eval, log) on tiny models.

Each command runs through `cli.main([...])` in this process; expected values come from
transformers, the safetensors files or the update-log format, not from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.tiny import make_tiny_model
from zostream.clients.cli import main

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "hello there how are you",
    "yes no maybe so",
    "the answer is four",
    "paris is in france",
    "rome is in italy",
]
CPU = ["--device", "cpu"]
HYPER = shlex.split("--batch-size 2 --q 1 --lr 1e-2 --eps 1e-2 --max-len 16 --device cpu")  # MeZO


def _tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in memory, 92 ids (< the tiny models' vocab of 101), ChatML template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=96, special_tokens=specials))
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    out.chat_template = CHATML
    assert len(out) <= 101
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = make_tiny_model(tmp_path_factory.mktemp("models"), "llama")
    _tokenizer().save_pretrained(d)
    return d


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only cost time


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOSTREAM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    recs = [{"prompt": c.split()[0], "completion": " " + " ".join(c.split()[1:])} for c in CORPUS]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in CORPUS[:4]))
    choice = [
        {"prompt": "the cat sat on the", "candidates": [" mat", " park"], "answer": 0},
        {"prompt": "paris is in", "candidates": [" italy", " france"], "answer": " france"},
    ]
    (d / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choice))
    (d / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n" + '{"prompt": "x", "completion": \n')
    return {p.stem: p for p in d.iterdir()}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv: str):
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def usage_exit(capsys, *argv: str) -> str:
    """argv must fail with exit code 2 (argparse or UsageError) and a one-line message, no traceback."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


# ---- generate ---------------------------------------------------------------------------------
def test_generate_json_matches_transformers_greedy(capsys, model):
    argv = ["generate", "--model", model, *CPU, "--max-new-tokens", 6, "--ignore-eos", "the cat sat"]
    a = run_json(capsys, *argv)
    b = run_json(capsys, *argv)
    a.pop("seed"), b.pop("seed")  # random when --seed is not given; greedy does not use it
    assert a == b
    tok = AutoTokenizer.from_pretrained(model)
    prompt = tok("the cat sat")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    want = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    want = want[0, len(prompt) :].tolist()
    assert a["token_ids"] == want
    assert a["text"] == tok.decode(want, skip_special_tokens=True)
    assert a["finish_reason"] == "max_tokens"
    assert (a["prompt_tokens"], a["completion_tokens"]) == (len(prompt), 6)


def test_generate_batch_equals_one_at_a_time(capsys, model):
    base = ["generate", "--model", model, *CPU, "--max-new-tokens", 5, "--ignore-eos"]
    both = run_json(capsys, *base, "hello there", "rome is in italy and")
    assert isinstance(both, list) and len(both) == 2
    for obj, prompt in zip(both, ["hello there", "rome is in italy and"], strict=True):
        assert isinstance(obj["seed"], int)
        alone = run_json(capsys, *base, prompt)
        assert obj["token_ids"] == alone["token_ids"] and obj["text"] == alone["text"]


def test_generate_sampling_seed_reproducible(capsys, model):
    base = ["generate", "--model", model, *CPU, "--max-new-tokens", 8, "--ignore-eos", "--temperature", 1.5]
    a = run_json(capsys, *base, "--seed", 7, "the", "the")
    b = run_json(capsys, *base, "--seed", 7, "the", "the")
    assert a == b
    assert [o["seed"] for o in a] == [7, 8]  # prompt i uses seed S+i


def test_generate_stream_and_chat(capsys, model):
    base = [
        "generate",
        "--model",
        model,
        *CPU,
        *shlex.split("--max-new-tokens 6 --ignore-eos --chat --system be"),
    ]
    want = run_json(capsys, *base, "hello")
    tok = AutoTokenizer.from_pretrained(model)
    msgs = [{"role": "system", "content": "be"}, {"role": "user", "content": "hello"}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert want["prompt_tokens"] == len(tok(rendered, add_special_tokens=False)["input_ids"])
    rc, out, _ = run(capsys, *base, "--stream", "hello")
    assert rc == 0 and out == want["text"] + "\n"
    rc, out, _ = run(capsys, *base, "hello")
    assert rc == 0 and out == want["text"] + "\n"


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--gpu-memory", "banana"], "--gpu-memory"),
        (["--codec", "xyz"], "--codec"),
        (["--top-p", "2"], "--top-p"),
        (["--device", "tpu"], "--device"),
        (["--max-new-tokens", "500"], "--max-new-tokens"),  # > the model's 128 positions
        (["--stop", ""], "--stop"),
        (["--adapter", "/nonexistent"], "--adapter"),
    ],
)
def test_generate_bad_flags_exit_2(capsys, model, extra, flag):
    err = usage_exit(capsys, "generate", "--model", model, *CPU, *extra, "hello")
    assert flag in err


def test_generate_bad_model_dir_exit_2(capsys, tmp_path):
    assert "--model" in usage_exit(capsys, "generate", "--model", tmp_path / "nope", *CPU, "hi")
    assert "--model" in usage_exit(capsys, "generate", *CPU, "hi")


# ---- model info --------------------------------------------------------------------------------
def _file_tensors(model: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    out = {}
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(k)
            out[k] = (tuple(t.shape), t.numel() * t.element_size())
    return out


def test_model_info_json(capsys, model):
    files = _file_tensors(model)
    block_bytes = sum(b for k, (_, b) in files.items() if ".layers." in k)
    info = run_json(capsys, "model", "info", model, "--gpu-memory", "0", "--link-gbps", "10")
    assert info["layers"] == 3 and info["family"] == "llama" and info["dtype"] == "float32"
    assert info["parameters"] == sum(math.prod(s) for s, _ in files.values())
    assert sum(info["block_bytes"]) == block_bytes
    assert info["outer_bytes"] == sum(b for k, (_, b) in files.items() if ".layers." not in k)
    assert info["streamed_blocks"] == [0, 1, 2] and not info["fits"]
    assert info["seconds_per_pass"] == pytest.approx(block_bytes / 10e9, rel=1e-12)
    assert "streaming buys nothing" not in capsys.readouterr().err


def test_model_info_nf4_packed_bytes(capsys, model):
    files = _file_tensors(model)
    packed = 0
    for k, (shape, nbytes) in files.items():
        if ".layers.0." not in k:
            continue
        if len(shape) == 2:  # linear weights: 4 bits per element + one f32 absmax per 64 elements
            packed += math.prod(shape) // 2 + 4 * math.ceil(math.prod(shape) / 64)
        else:
            packed += nbytes  # norms travel raw
    info = run_json(capsys, "model", "info", model, "--codec", "nf4", "--gpu-memory", "0")
    assert info["packed_block_bytes"] == [packed] * 3
    assert info["seconds_per_pass"] == pytest.approx(3 * packed / 54e9, rel=1e-12)


def test_model_info_fits_warning(capsys, model):
    rc, out, err = run(capsys, "model", "info", model, "--gpu-memory", "1GiB")
    assert rc == 0
    assert "WARNING" in err and "streaming buys nothing" in err
    assert "layers" in out and "3" in out
    info = run_json(capsys, "model", "info", model, "--gpu-memory", "1GiB")
    assert info["fits"] and info["streamed_blocks"] == [] and info["seconds_per_pass"] == 0


def test_model_info_kv_cache_share(capsys, model):
    """K and V of every layer per token: 2 x 3 layers x 2 kv heads x head_dim 8 x 4 bytes (tiny llama)."""
    per = 2 * 3 * 2 * 8 * 4
    info = run_json(capsys, "model", "info", model, "--gpu-memory", "0", "--max-batch", "4")
    # budget 0 streams every block: the pool holds max-batch sequences of max-seq-len (the model's 128)
    assert info["kv_bytes_per_token"] == per and info["max_seq_len"] == 128
    assert info["kv_tokens"] == 4 * 128 and info["kv_bytes"] == 4 * 128 * per
    info = run_json(capsys, "model", "info", model, "--gpu-memory", "1MB", "--kv-memory", "100000")
    assert info["kv_tokens"] == 100000 // (16 * per) * 16 and info["kv_full_sequences"] == 2
    # the weights' plan gets the budget minus the KV pool: nothing resident once the pool takes it all
    full = run_json(capsys, "model", "info", model, "--gpu-memory", "1MB")
    squeezed = run_json(capsys, "model", "info", model, "--gpu-memory", "1MB", "--kv-memory", "999000")
    assert len(squeezed["resident_blocks"]) < len(full["resident_blocks"])
    # offloaded, every block streamed: the pool lives in host memory, the device holds 2 staging pools
    off = run_json(capsys, "model", "info", model, "--gpu-memory", "0", "--max-batch", "4", "--kv-offload")
    assert off["kv_offload"] and off["kv_host_bytes"] == 4 * 128 * per
    assert off["kv_device_bytes"] == 2 * (4 * 128 * per) // 3


def test_model_info_host_budget_predicts_the_disk_bound_pass(capsys, model):
    files = _file_tensors(model)
    block_bytes = sum(b for k, (_, b) in files.items() if ".layers." in k)
    argv = ("model", "info", model, "--gpu-memory", "0", "--link-gbps", "10", "--host-memory", "0")
    info = run_json(capsys, *argv, "--disk-gbps", "2")
    assert info["disk_blocks"] == [0, 1, 2] and info["disk_bytes_per_pass"] == block_bytes
    assert not info["disk_rate_measured"]
    assert info["disk_seconds_per_pass"] == pytest.approx(block_bytes / 2e9, rel=1e-12)
    assert info["seconds_per_pass"] == pytest.approx(max(block_bytes / 10e9, block_bytes / 2e9), rel=1e-12)
    measured = run_json(capsys, *argv)  # no --disk-gbps: read the model file to measure the rate
    assert measured["disk_rate_measured"] and measured["disk_gbps"] > 0
    roomy = run_json(capsys, "model", "info", model, "--gpu-memory", "0", "--host-memory", "1GiB")
    assert roomy["disk_blocks"] == [] and roomy["disk_seconds_per_pass"] == 0


# ---- train / eval -------------------------------------------------------------------------------
def _header_size(log: Path) -> int:
    raw = log.read_bytes()
    assert raw[:6] == b"ZOLOG\0"
    return 12 + struct.unpack("<I", raw[8:12])[0] + 4


def train_argv(model, data, out, method="lora", steps=3) -> list:
    return [
        "train",
        "--model",
        model,
        "--data",
        data["train"],
        "--method",
        method,
        "--out",
        out,
        "--steps",
        steps,
    ]


def train(capsys, model, data, out, method="lora", steps=3, *extra):
    return run_json(capsys, *train_argv(model, data, out, method, steps), *HYPER, *extra)


def test_train_reports_a_slow_climb(capsys, model, data, tmp_path, monkeypatch):
    """The divergence guard's trips show on stderr and in metrics.jsonl (each step's mean loss forced to
    tests/engine/test_climb.py's hand-worked sequence, which trips a window-2 rule at steps 8 and 14)."""
    from tests.engine.test_climb import CLIMB, TRIPS
    from zostream.engine import climb, trainer
    from zostream.engine.config import ZOConfig

    real = trainer.ZOStepWorkload.losses

    def losses(self: trainer.ZOStepWorkload) -> list[tuple[float, float]]:
        return [(CLIMB[self.step] + (lp - lm) / 2, CLIMB[self.step] - (lp - lm) / 2) for lp, lm in real(self)]

    monkeypatch.setattr(trainer.ZOStepWorkload, "losses", losses)
    monkeypatch.setattr(ZOConfig, "climb_rule", lambda self: climb.ClimbRule(window=2, rise=0.5))
    rc, _, err = run(capsys, *train_argv(model, data, tmp_path / "job", "lora", len(CLIMB)), *HYPER)
    assert rc == 0 and err.count("slow climb") == 2, err
    rows = [json.loads(x) for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step" and r["climb"]] == TRIPS


@pytest.mark.parametrize("method, result", [("lora", "adapter"), ("full", "model")])
def test_train_3_steps(capsys, model, data, tmp_path, method, result):
    s = train(capsys, model, data, tmp_path / "job", method, 3, "--eval", data["text"])
    log = tmp_path / "job" / "update.log"
    assert s["steps"] == 3 and s["method"] == method and not s["interrupted"]
    assert s["update_log"] == str(log) and s["update_log_bytes"] == log.stat().st_size
    assert log.stat().st_size == _header_size(log) + 20 * 3  # format 3: 20 bytes per record
    assert s["output"] == str(tmp_path / "job" / result)
    marker = "adapter_config.json" if method == "lora" else "model.safetensors"
    assert (tmp_path / "job" / result / marker).exists()
    rows = [json.loads(x) for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert s["final_train_loss"] == pytest.approx(sum(r["loss"] for r in steps) / 3)
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3]
    assert s["eval_loss_before"] == evals[0]["loss"] and s["eval_loss"] == evals[1]["loss"]
    assert s["eval_accuracy"] is None  # text records: no accuracy
    if method == "lora":  # the exported adapter scores what training's final eval reported
        argv = ["eval", "--model", model, "--adapter", s["output"], "--data", data["text"]]
        e = run_json(capsys, *argv, "--batch-size", 2, "--max-len", 16, *CPU)
        assert e["loss"] == pytest.approx(s["eval_loss"], rel=1e-6)


def test_train_resume_equals_one_run(capsys, model, data, tmp_path):
    job = tmp_path / "job"
    train(capsys, model, data, job, "lora", 3)
    rc, out, err = run(capsys, *train_argv(model, data, job, "lora", 5), *HYPER, "--json")
    assert rc == 0 and "resuming at step 3" in err
    s = json.loads(out.strip().splitlines()[-1])
    assert (s["steps"], s["steps_this_run"], s["resumed_from"]) == (5, 2, 3)
    log = job / "update.log"
    assert log.stat().st_size == _header_size(log) + 20 * 5  # 20-byte records (format 3)
    once = train(capsys, model, data, tmp_path / "once", "lora", 5)
    log1 = tmp_path / "once" / "update.log"
    # the records are the same; the header differs only in its informational "steps" total
    assert log1.read_bytes()[_header_size(log1) :] == log.read_bytes()[_header_size(log) :]
    a = load_file(job / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(once["output"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_resume_checks_flags(capsys, model, data, tmp_path):
    train(capsys, model, data, tmp_path / "job", "lora", 2)
    base = train_argv(model, data, tmp_path / "job", "lora", 2)
    assert "--eps" in usage_exit(capsys, *base, *HYPER, "--eps", 1e-2 * 2)
    assert "--lr-schedule" in usage_exit(capsys, *base, *HYPER, "--lr-schedule", "linear")
    assert "--method" in usage_exit(capsys, *train_argv(model, data, tmp_path / "job", "full", 2), *HYPER)
    # a linear schedule depends on the total: --steps cannot change on resume
    train(capsys, model, data, tmp_path / "lin", "lora", 2, "--lr-schedule", "linear")
    lin = train_argv(model, data, tmp_path / "lin", "lora", 4)
    assert "--steps" in usage_exit(capsys, *lin, *HYPER, "--lr-schedule", "linear")


def test_train_rejects_bad_input(capsys, model, data, tmp_path):
    job = tmp_path / "job"
    lora, full = train_argv(model, data, job, "lora"), train_argv(model, data, job, "full")
    assert "--codec" in usage_exit(capsys, *full, *CPU, "--codec", "nf4")
    bad = {**data, "train": data["bad"]}
    assert "bad.jsonl line 2" in usage_exit(capsys, *train_argv(model, bad, job), *CPU)
    missing = {**data, "train": tmp_path / "missing.jsonl"}
    assert "--data" in usage_exit(capsys, *train_argv(model, missing, job), *CPU)
    assert "--lr" in usage_exit(capsys, *lora, *CPU, "--lr", "-1")
    assert "--lora-targets" in usage_exit(capsys, *lora, *CPU, "--lora-targets", "nope_proj")
    assert "--eval" in usage_exit(capsys, *lora, *CPU, "--eval", tmp_path / "missing.jsonl")
    assert not (job / "update.log").exists()  # refused before the job was created


def test_train_ctrl_c_stops_after_step(capsys, model, data, tmp_path, monkeypatch):
    from zostream.engine.trainer import ZOTrainer

    orig = ZOTrainer.run_step

    def run_step(self):
        res = orig(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C arrived during step 1
        return res

    monkeypatch.setattr(ZOTrainer, "run_step", run_step)
    job = tmp_path / "job"
    # A suite started in the background (nohup, `&` in a non-interactive shell) begins with SIGINT
    # ignored, not with default_int_handler: the command must put back whatever it found.
    before = signal.getsignal(signal.SIGINT)
    rc, out, err = run(capsys, *train_argv(model, data, job, "lora", 4), *HYPER, "--json")
    assert rc == 130 and "interrupted" in err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["interrupted"] and s["steps"] == 2 and s["output"] is None
    assert (job / "update.log").stat().st_size == _header_size(job / "update.log") + 20 * 2
    assert (job / "checkpoints" / "step-000002" / "adapter_config.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_train_resume_repairs_a_torn_log_and_its_working_copy(capsys, model, data, tmp_path):
    """A full job whose last update.log record was torn after its working copy took the step: resuming
    cuts the tail, rebuilds the groups that are ahead of the log and retrains the step, bitwise what an
    uninterrupted run gives (the job runner's repair, now the CLI's too)."""
    job = tmp_path / "job"
    train(capsys, model, data, job, "full", 3)
    log = job / "update.log"
    with open(log, "r+b") as f:
        f.truncate(log.stat().st_size - 5)  # step 2's record torn; the working copy holds 3 steps
    rc, out, err = run(capsys, *train_argv(model, data, job, "full", 4), *HYPER, "--json")
    assert rc == 0 and "truncated" in err and "resuming at step 2" in err, err
    once = train(capsys, model, data, tmp_path / "once", "full", 4)
    assert (
        log.read_bytes()[_header_size(log) :]
        == (tmp_path / "once" / "update.log").read_bytes()[_header_size(log) :]
    )
    a = load_file(job / "model" / "model.safetensors")
    b = load_file(Path(once["output"]) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_keep_best_and_early_stopping(capsys, model, data, tmp_path):
    job = tmp_path / "job"
    base = train_argv(model, {**data, "train": data["choice"]}, job, "lora", 12)
    lifecycle = ["--eval", data["choice"], "--eval-every", 1, "--keep-best", "--early-stopping-patience", 2]
    s = run_json(capsys, *base, *HYPER, "--lr", 0.5, *lifecycle)
    rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    acc = [(r["step"], r["accuracy"]) for r in rows if r["type"] == "eval"]
    # The rules, written out: the best is the first highest accuracy; stop at the 2nd miss in a row.
    best, misses, stop = acc[0], 0, None
    for step, a in acc[1:]:
        if a > best[1]:
            best, misses = (step, a), 0
        else:
            misses += 1
        if misses == 2:
            stop = step
            break
    assert (s["best_step"], s["best_value"], s["output_step"]) == (best[0], best[1], best[0])
    assert s["steps"] == (stop if stop is not None else 12) and bool(s["stopped_early"]) == (stop is not None)
    ref = tmp_path / "ref"
    run_json(capsys, "log", "export", job / "update.log", "--base", model, "--out", ref, "--upto", best[0])
    a = load_file(job / "adapter" / "adapter_model.safetensors")
    b = load_file(ref / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora = train_argv(model, data, tmp_path / "j2", "lora")
    assert "--keep-best" in usage_exit(capsys, *lora, *CPU, "--keep-best")
    assert "--eval-every" in usage_exit(
        capsys, *lora, *CPU, "--eval", data["choice"], "--early-stopping-patience", 1
    )


def test_eval_loss_matches_transformers(capsys, model, data):
    rc, out, _ = run(capsys, "eval", "--model", model, "--data", data["text"], *CPU)
    assert rc == 0 and "loss" in out
    e = run_json(capsys, "eval", "--model", model, "--data", data["text"], "--batch-size", 3, *CPU)
    tok = AutoTokenizer.from_pretrained(model)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    total = count = 0.0
    with torch.no_grad():
        for text in CORPUS[:4]:
            ids = torch.tensor([tok(text)["input_ids"]])
            total += float(ref(ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert e["loss"] == pytest.approx(total / count, rel=1e-5)
    assert e["accuracy"] is None and e["examples"] == 4
    c = run_json(capsys, "eval", "--model", model, "--data", data["choice"], *CPU)
    assert c["accuracy"] in (0.0, 0.5, 1.0) and c["examples"] == 2


# ---- log ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full"])
def test_log_info_verify_replay(capsys, model, data, tmp_path, method):
    s = train(capsys, model, data, tmp_path / "job", method, 3)
    log = tmp_path / "job" / "update.log"
    before = log.read_bytes()
    info = run_json(capsys, "log", "info", log)
    assert (info["steps"], info["bytes_per_step"], info["method"]) == (3, 20, method)  # format 3 records
    assert info["first_lr"] == info["last_lr"] == struct.unpack("<f", struct.pack("<f", 1e-2))[0]
    assert info["header"]["eps"] == 1e-2 and not info["damaged"]
    gs = [struct.unpack_from("<f", before, _header_size(log) + 20 * i + 6)[0] for i in range(3)]
    assert info["mean_abs_g"] == pytest.approx(sum(map(abs, gs)) / 3, rel=1e-12)
    losses = [struct.unpack_from("<f", before, _header_size(log) + 20 * i + 14)[0] for i in range(3)]
    assert info["first_loss"] == info["last_loss"] == pytest.approx(sum(losses) / 3, rel=1e-12)
    rc, out, _ = run(capsys, "log", "verify", log)
    assert rc == 0 and out.startswith("ok: 3")

    out_dir = tmp_path / "replayed"
    r = run_json(capsys, "log", "replay", "--base", model, log, "--out", out_dir)
    assert r["steps"] == 3
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(out_dir / name), load_file(Path(s["output"]) / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # damage the last record: verify fails, info reports it, neither modifies the file
    damaged = tmp_path / "damaged.log"
    damaged.write_bytes(before[:-3] + bytes([before[-3] ^ 0xFF]) + before[-2:])
    rc, out, _ = run(capsys, "log", "verify", damaged)
    assert rc == 1 and out.startswith("damaged: 2")
    info = run_json(capsys, "log", "info", damaged)
    assert info["damaged"] and info["steps"] == 2
    assert damaged.read_bytes()[:-3] == before[:-3] and log.read_bytes() == before


def test_log_export_upto_and_compact(capsys, model, data, tmp_path):
    train(capsys, model, data, tmp_path / "job", "lora", 3)
    log = tmp_path / "job" / "update.log"
    run_json(capsys, "log", "export", log, "--base", model, "--out", tmp_path / "two", "--upto", 2)
    train(capsys, model, data, tmp_path / "job2", "lora", 2)
    a = load_file(tmp_path / "two" / "adapter_model.safetensors")
    b = load_file(tmp_path / "job2" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    argv = ["log", "replay", log, "--base", model, "--out", tmp_path / "x", "--upto", 9]
    assert "--upto" in usage_exit(capsys, *argv)
    c = run_json(capsys, "log", "compact", log, tmp_path / "c.log")
    assert c["steps"] == 3 and c["dst_bytes"] == (tmp_path / "c.log").stat().st_size
    assert "DST" in usage_exit(capsys, "log", "compact", log, tmp_path / "c.log")
    rc, _, _ = run(capsys, "log", "verify", tmp_path / "c.log")
    assert rc == 0
    assert "LOG" in usage_exit(capsys, "log", "info", tmp_path / "missing.log")
