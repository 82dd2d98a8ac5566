"""Shared bench pieces: random-weight model dirs from real config shapes, device timers, raw link
rates, the physical floors the benches compare against, and markdown tables.

Every bench prints ratios measured in ONE run on ONE machine (link, forward and the engine's
own numbers), never absolute claims and never assertions on timings.

On a CUDA device timed regions are bracketed by CUDA events (with one synchronize before and
after the region only); on the CPU the "link" is a host memcpy, timed the same way with
perf_counter, so every bench also runs (as a smoke check) on a machine without a GPU.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zostream.engine.models import family_for

# Real model shapes (transformers AutoConfig.for_model kwargs, num_hidden_layers set per run).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "opt-13b": dict(
        model_type="opt",
        hidden_size=5120,
        ffn_dim=20480,
        num_attention_heads=40,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=5120,
        do_layer_norm_before=True,
    ),
    "opt-30b": dict(
        model_type="opt",
        hidden_size=7168,
        ffn_dim=28672,
        num_attention_heads=56,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=7168,
        do_layer_norm_before=True,
    ),
    "llama3-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "opt-175b-width": dict(
        model_type="opt",
        hidden_size=12288,
        ffn_dim=49152,
        num_attention_heads=96,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=12288,
        do_layer_norm_before=True,
    ),
    # CPU smoke runs: the same code paths at a size a loaded 2-core machine runs in seconds.
    "tiny": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        rope_theta=500000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "tiny-opt": dict(
        model_type="opt",
        hidden_size=256,
        ffn_dim=512,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=512,
        word_embed_proj_dim=256,
        do_layer_norm_before=True,
    ),
}

_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_MODEL_FORMAT = 1  # bump when the on-disk layout written here changes
_GEN_CHUNK = 1 << 24  # elements generated per chunk: bounds peak memory whatever the tensor size


def default_root() -> Path:
    """$ZOSTREAM_CACHE_DIR/bench, else ~/.cache/zostream/bench."""
    env = os.environ.get("ZOSTREAM_CACHE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "zostream"
    return base / "bench"


def hf_config(shape: str, layers: int) -> Any:
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    kw = dict(SHAPES[shape])
    return AutoConfig.for_model(kw.pop("model_type"), num_hidden_layers=layers, **kw)


# ---------------------------------------------------------------------------------------------- models


def make_model(
    shape: str,
    layers: int,
    dtype: torch.dtype = torch.bfloat16,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    layers_per_shard: int = 4,
) -> Path:
    """A Hugging Face model dir (config.json, sharded safetensors + index, no tokenizer) with random
    weights: N(0, 0.02) matrices, norm weights 1, biases 0. Cached by (shape, layers, dtype).

    Tensors are generated chunk by chunk (on `device`: a GPU fills 10 GB in seconds) and streamed
    into hand-written safetensors files, so the whole model never exists in memory at once.
    """
    root = Path(root) if root is not None else default_root()
    out = root / "models" / f"{shape}-L{layers}-{_DTYPE_NAMES[dtype]}-v{_MODEL_FORMAT}"
    if (out / "complete").exists():
        return out
    cfg = hf_config(shape, layers)
    fam = family_for(cfg)
    spec = fam.make_spec(cfg)
    shards: list[dict[str, tuple[int, ...]]] = [dict(fam.outer_tensors(spec))]
    for first in range(0, layers, layers_per_shard):
        shard: dict[str, tuple[int, ...]] = {}
        for i in range(first, min(first + layers_per_shard, layers)):
            shard |= {fam.layer_prefix(i) + k: v for k, v in fam.block_tensors(spec).items()}
        shards.append(shard)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.dtype = dtype
    cfg.save_pretrained(tmp)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(tmp / name, shard, dtype, lambda n, s: _random_fill(n, s, dtype, gen))
        weight_map |= dict.fromkeys(shard, name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "complete").write_text("ok\n")
    if out.exists():  # a half-written dir from an interrupted run
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _random_fill(
    name: str, numel_range: tuple[int, int], dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """Elements [start, stop) of tensor `name`, flattened, as host `dtype` values."""
    start, stop = numel_range
    n = stop - start
    if name.endswith(".bias"):
        return torch.zeros(n, dtype=dtype)
    if "norm" in name or "layer_norm" in name:
        return torch.ones(n, dtype=dtype)
    x = torch.empty(n, dtype=torch.float32, device=gen.device).normal_(0.0, 0.02, generator=gen)
    return x.to(dtype).cpu()


def _write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    fill: Callable[[str, tuple[int, int]], torch.Tensor],
) -> int:
    """Header first, then each tensor's data streamed in chunks; returns the data bytes written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            n = math.prod(shape)
            for s in range(0, n, _GEN_CHUNK):
                chunk = fill(name, (s, min(s + _GEN_CHUNK, n)))
                f.write(chunk.view(torch.uint8).numpy().tobytes())
    return off


class TokenStandIn:
    """The engine's tokenizer interface for token-id prompts: decodes to "", no EOS, no template."""

    eos_token_id = None
    pad_token_id = None
    chat_template = None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- timing


class Timer:
    """Wall time of a region of device work: CUDA events on the current stream (one synchronize
    before the region so earlier work is excluded, one at the end); perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize(self.device)  # also waits for side streams the region used
            self.seconds = self._start.elapsed_time(end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


@dataclass(frozen=True)
class LinkRates:
    """Bytes/s of raw copies: host→device, device→host, and both directions at once (sum)."""

    h2d: float
    d2h: float
    both: float
    kind: str  # "pinned PCIe" or "host memcpy"


def measure_link(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> LinkRates:
    """Raw link rates in this process. CUDA: pinned host tensor <-> device, `reps` copies of
    `nbytes` on side streams, timed by events (the both-ways rate runs H2D and D2H on two streams
    from one start event). CPU: a `nbytes` memcpy (what the CPU streamer's "link" is)."""
    if device.type != "cuda":
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in before timing
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        rate = nbytes * reps / max(time.perf_counter() - t0, 1e-9)
        return LinkRates(rate, rate, rate, "host memcpy")
    h_src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    h_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d_dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    d_src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(jobs: list[tuple[torch.cuda.Stream, torch.Tensor, torch.Tensor]]) -> float:
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        ends = []
        for stream, dst, src in jobs:
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                for _ in range(reps):
                    dst.copy_(src, non_blocking=True)
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
                ends.append(end)
        torch.cuda.synchronize(device)
        seconds = max(start.elapsed_time(e) for e in ends) / 1e3
        return len(jobs) * reps * nbytes / seconds

    h2d, d2h = (s1, d_dst, h_src), (s2, h_dst, d_src)
    timed([h2d, d2h])  # warm-up: first-touch and DMA setup out of the timed runs
    rates = LinkRates(timed([h2d]), timed([d2h]), timed([h2d, d2h]), "pinned PCIe")
    del h_src, h_dst, d_dst, d_src
    torch.cuda.empty_cache()
    return rates


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset_peak; None on the CPU (printed "-")."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- floors


def decode_floor_tokens_per_s(batch: int, link_h2d: float, streamed_bytes: int) -> float:
    """A fully streamed decode pass moves every streamed block once: tokens/s <= B * link / bytes."""
    return batch * link_h2d / streamed_bytes if streamed_bytes > 0 else float("inf")


def zo_block_floor(fwd_s: float, h2d: float, d2h: float, link: LinkRates, forwards: int = 2) -> float:
    """One block of a ZO step: its `forwards` (2q) forwards, or its transfers, whichever is longer."""
    return max(forwards * fwd_s, h2d / link.h2d, d2h / link.d2h, (h2d + d2h) / link.both)


def zo_step_floor(
    fwd_blocks: list[float],
    h2d_blocks: list[float],
    d2h_blocks: list[float],
    link: LinkRates,
    forwards: int = 2,
) -> float:
    """Σ_blocks max(2q · forward, H2D / link, D2H / link, (H2D + D2H) / both-ways link)."""
    return sum(
        zo_block_floor(f, h, d, link, forwards)
        for f, h, d in zip(fwd_blocks, h2d_blocks, d2h_blocks, strict=True)
    )


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return float("nan")
    return a / b


# ---------------------------------------------------------------------------------------------- output


def fmt(x: object, digits: int = 3) -> str:
    """Numbers to `digits` significant figures; None / NaN to "-"; strings as they are."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        return "-"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if -3 <= mag < 6:
        return f"{v:.{max(digits - 1 - mag, 0)}f}"
    return f"{v:.{digits - 1}e}"


def table(title: str, headers: list[str] | str, rows: list[list[object]]) -> str:
    """A markdown table under a '### title' line (cells through fmt; headers a list or "a|b|c")."""
    if isinstance(headers, str):
        headers = headers.split("|")
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_table(text: str, title: str) -> list[dict[str, str]]:
    """The rows of the markdown table printed under '### title' (for the smoke test and tooling)."""
    lines = text.splitlines()
    start = lines.index(f"### {title}")
    rows = [ln for ln in lines[start + 1 :] if ln.strip()]
    body: list[str] = []
    for ln in rows:
        if not ln.startswith("|"):
            break
        body.append(ln)
    headers = [c.strip() for c in body[0].strip("|").split("|")]
    return [dict(zip(headers, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in body[2:]]


def machine_line(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = (
            f"CPU ({os.cpu_count()} logical cores, {platform.processor() or platform.machine()}, "
            f"torch threads {torch.get_num_threads()})"
        )
    return f"device: {what}; torch {torch.__version__}"


def log(msg: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def mb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 1e6


def real_model_args(p: Any) -> None:
    """--model and --threads, as real_model reads them."""
    p.add_argument("--model", default=None, help="model dir (default: the cached demo model)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def real_model(p: Any, a: Any) -> Path:
    """The benches on the real model: --model, or the cached demo model (p.error when it is missing);
    --threads N > 0 sets torch's CPU threads first."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        return Path(a.model)
    from zostream.clients import demo_model

    model = demo_model.default_dir()
    if not demo_model.is_complete(model):
        p.error(f"no demo model in {model}: run `zostream model fetch-demo` first, or pass --model")
    return model


@dataclass(frozen=True)
class RealTask:
    """A bench task on the real model: its weights, pad id and the task's train / held-out datasets."""

    store: Any  # engine.store.WeightStore
    pad: int
    train: Any  # engine.data.Dataset
    held: Any


def real_task(model: Path, task: Path, max_len: int = 256) -> RealTask:
    """Open `model` and load `task`/train.jsonl and eval.jsonl (a bench/*_task.py directory)."""
    from zostream.engine import data as D
    from zostream.engine.engine_setup import load_tokenizer
    from zostream.engine.store import WeightStore

    tok = load_tokenizer(str(model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    load = lambda name: D.load_dataset(task / name, tok, max_len=max_len)  # noqa: E731
    return RealTask(WeightStore(model), pad, load("train.jsonl"), load("eval.jsonl"))
