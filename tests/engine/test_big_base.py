"""Bases the process cannot copy: a read-only model directory, and a sparse base larger than RAM.

Each case runs the engine in a child process (`_CHILD`): open the base, generate tokens greedily,
run one LoRA ZO step, report the tokens, the step and the peak RSS. The generated tokens are checked
against transformers on a small model with the same weights (independent reference).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import make_tiny_model

LINUX_PROC = pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc")
PROMPT = [5, 17, 3, 99, 42]
NEW_TOKENS = 3
ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import json, os, sys
import torch
torch.set_num_threads(1)
from zostream.engine import data as D
from zostream.engine.config import EngineConfig, LimitsConfig, StreamConfig, ZOConfig
from zostream.engine.engine import Engine
from zostream.engine.finetune import open_trainer
from zostream.engine.generation import GenerateRequest, StopParams
from zostream.engine.sampling import SamplingParams

model, job, prompt, n = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
probe = os.path.join(model, "model.safetensors")
try:
    open(probe, "r+b").close()
    writable = True
except OSError:
    writable = False


class Tok:
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


cfg = EngineConfig(model, device="cpu", stream=StreamConfig(gpu_memory_bytes=0),
                   limits=LimitsConfig(max_batch=1, max_seq_len=32))
eng = Engine(cfg, tokenizer=Tok())
req = GenerateRequest("a", prompt, SamplingParams(), StopParams(max_new_tokens=n, ignore_eos=True))
tokens = list(eng.generate([req])["a"].token_ids)
rows = [D.Example(tuple(prompt), (D.IGNORE, *prompt[1:]))]
zo = ZOConfig(method="lora", steps=1, batch_size=1, max_len=16)
tr = open_trainer(zo, job, eng.store, D.Dataset("text", rows), 0, eng.device, eng.dtype, eng.streamer,
                  cfg.stream)
step = tr.run_step()
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"tokens": tokens, "loss": step.get("loss"), "projected_grad": step.get("projected_grad"),
                  "step": tr.step, "writable": writable, "peak_rss": int(status["VmHWM"].split()[0]) * 1024}))
"""


def run_child(model: Path, job: Path, as_nobody: bool = False) -> dict:
    # A home of its own, as a service user has: the inherited one may not be writable by that user, and
    # caches (numba's compiled kernels, Hugging Face) live under it.
    home = job.parent / "hf"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HOME": str(home),
    }
    env.pop("XDG_CACHE_HOME", None)
    # Root ignores permission bits: the child then runs as an unprivileged user.
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    proc = subprocess.run(
        [*drop, sys.executable, "-c", _CHILD, str(model), str(job), json.dumps(PROMPT), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_tokens(model_dir: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = ref.generate(
        torch.tensor([PROMPT]),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(PROMPT) :].tolist()


@LINUX_PROC
def test_read_only_base_directory_opens_generates_and_trains_lora(tmp_path):
    small = make_tiny_model(tmp_path, "llama")
    want = reference_tokens(small)
    # Outside pytest's 0700 tmp root, so that an unprivileged child can reach it.
    top = Path(tempfile.mkdtemp(prefix="zostream-ro-"))
    try:
        os.chmod(top, 0o755)
        base = top / "base"
        shutil.copytree(small, base)
        for f in base.iterdir():
            os.chmod(f, 0o444)
        os.chmod(base, 0o555)
        job = top / "job"
        job.mkdir(mode=0o777)
        os.chmod(job, 0o777)
        (top / "hf").mkdir(mode=0o777)
        os.chmod(top / "hf", 0o777)
        as_nobody = os.geteuid() == 0
        if as_nobody and shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: the permission bits would not bind")
        before = {f.name: f.read_bytes() for f in base.iterdir()}
        got = run_child(base, job, as_nobody=as_nobody)
        assert got["writable"] is False  # the permission bits bind the child
        assert got["tokens"] == want
        assert got["step"] == 1 and got["loss"] is not None
        assert {f.name: f.read_bytes() for f in base.iterdir()} == before
        assert (job / "update.log").is_file()
    finally:
        if (top / "base").exists():
            os.chmod(top / "base", 0o755)
        shutil.rmtree(top, ignore_errors=True)


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemTotal")


def write_sparse_opt(small: Path, out: Path, size: int) -> int:
    """The small OPT's weights, with a learned-position table stretched until the file has `size`
    bytes. Only the small model's rows hold data; the rest is a hole (no disk blocks, reads as zeros).
    Generation touches only the rows of the positions it uses, so the run stays fast."""
    tensors = load_file(small / "model.safetensors")
    pos_name = "model.decoder.embed_positions.weight"
    pos = tensors.pop(pos_name)
    row = pos.shape[1] * pos.element_size()
    entries, blobs, at = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        entries[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    rows = size // row + 1
    entries[pos_name] = {"dtype": "F32", "shape": [rows, pos.shape[1]], "data_offsets": [at, at + rows * row]}
    head = json.dumps(entries).encode()
    head += b" " * (-len(head) % 8)
    cfg = json.loads((small / "config.json").read_text())
    cfg["max_position_embeddings"] = rows - 2  # OPT's table has 2 extra rows (position offset 2)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    path = out / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for raw in blobs:
            f.write(raw)
        f.write(pos.contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(8 + len(head) + at + rows * row)
    return path.stat().st_size


@LINUX_PROC
def test_sparse_base_larger_than_ram_opens_generates_and_trains_lora(tmp_path):
    small = make_tiny_model(tmp_path, "opt")
    want = reference_tokens(small)
    ram = _mem_total()
    big = tmp_path / "big"
    try:
        size = write_sparse_opt(small, big, ram + 2**30)
    except OSError as exc:  # a filesystem without sparse files or with a small file-size limit
        pytest.skip(f"cannot create a sparse {ram + 2**30}-byte file here: {exc}")
    assert size > ram
    assert os.stat(big / "model.safetensors").st_blocks * 512 < 2**20  # sparse: no disk used
    (tmp_path / "job").mkdir()
    got = run_child(big, tmp_path / "job")
    assert got["tokens"] == want
    assert got["step"] == 1 and got["loss"] is not None
    # A private mapping of the file is refused (ENOMEM) or, once paged, charged to the process; the
    # read-only shared mapping is neither. Interpreter + torch + transformers take a few hundred MB.
    assert got["peak_rss"] < 1.5 * 2**30, got["peak_rss"]
