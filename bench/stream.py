"""Streaming bench: the streamer's achieved H2D rate vs a raw pinned copy, and decode tokens/s
fully streamed vs fully resident, per codec and batch, against the link floor.

    python bench/stream.py [--shape llama3-8b,opt-13b] [--layers 8] [--codecs none,int8,nf4]
                           [--batches 1,8,64] [--device auto] [--new-tokens 16] [--quick] [--kv-offload]

For each shape (random bf16 weights, real config dims, `--layers` blocks):
  1. raw link: pinned host -> device copy rate (and D2H, both ways), measured in this run;
  2. streamer: an Engine with --gpu-memory 0 iterates `streamer.blocks()` for a few passes with
     no compute; bytes = streamer.stats.h2d_bytes (the packed bytes that crossed) -> GB/s and its
     ratio to the raw link; "dense GB/s" is the bf16 bytes those packed bytes stand for;
  3. decode: B token-id prompts through Engine.step(); only the decode passes are timed (from
     the first sampled token to the last). Floor for the streamed run: every decode pass moves
     every streamed block once, so tokens/s <= B * link / packed streamed bytes.
  4. with --kv-offload: decode again with every layer's KV in host memory (--kv-offload), its blocks
     uploaded with each streamed block and the new rows written back; floor = B * link / (streamed
     weight bytes + KV bytes uploaded per pass, as the engine counted them). On a CPU this runs on
     the emulated device (copy-engine threads), so it shows that the path works, not a rate.
The resident run (gpu_memory None) is measured once per shape with codec none: a resident
block is decoded to the compute dtype once, so its forward costs the same for every codec.
On a CPU the "link" is a memcpy and the CPU streamer copies nothing (it decodes mmap views):
the numbers only show that the code runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from common import (
    LinkRates,
    Timer,
    TokenStandIn,
    decode_floor_tokens_per_s,
    default_root,
    log,
    machine_line,
    make_model,
    mb,
    measure_link,
    ratio,
    release,
    resolve_device,
    split_list,
    table,
)

from zostream.engine.config import CodecConfig, EngineConfig, LimitsConfig, StreamConfig
from zostream.engine.engine import Engine
from zostream.engine.generation import GenerateRequest, StopParams
from zostream.engine.sampling import SamplingParams

LINK_TITLE = "raw link"
STREAMER_TITLE = "streamer H2D (gpu_memory 0, no compute)"
DECODE_TITLE = "decode tokens/s (streamed per codec vs resident bf16)"
QUICK = dict(
    shape="tiny",
    layers=2,
    batches="1,4",
    codecs="none,nf4",
    new_tokens=4,
    prompt_len=8,
    passes=2,
    link_mb=16,
    threads=1,
)
LINK_HEADERS = ["link", "H2D GB/s", "D2H GB/s", "both ways GB/s"]
STREAMER_HEADERS = (
    "shape|codec|packed MB/pass|dense MB/pass|s/pass|GB/s|raw link GB/s|streamer/link|dense-equiv GB/s"
    "|host path"
)
DECODE_HEADERS = (
    "shape|codec|batch|streamed tok/s|resident tok/s|floor tok/s|streamed/floor|streamed/resident|host path"
)
KV_TITLE = "streamed decode with KV offload (every layer's KV in host memory, riding its block's copies)"
KV_HEADERS = (
    "shape|codec|batch|context|device|offload tok/s|weights MB/pass|KV up MB/pass|KV down MB/pass"
    "|floor tok/s|offload/floor"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b,opt-13b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--codecs", default="none,int8,nf4")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--device", default="auto")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--passes", type=int, default=3, help="timed streamer passes")
    p.add_argument("--link-mb", type=int, default=1024, help="bytes per raw link copy (CPU: 64)")
    p.add_argument("--cache", default=None, help="model + codec cache dir (default: the zostream cache)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; --quick: 1)"
    )
    p.add_argument("--quick", action="store_true", help="tiny, 2 layers, batches 1,4, none+nf4, 4 tokens")
    p.add_argument(
        "--kv-offload",
        action="store_true",
        help="also decode with --kv-offload (on cuda; on a CPU through the emulated device): floor = "
        "B * link / (streamed weight bytes + KV bytes uploaded per pass)",
    )
    a = p.parse_args(argv)
    if a.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token comes from the prefill pass)")
    return a


def open_engine(
    model_dir: Path,
    device: torch.device,
    codec: str,
    gpu_memory: int | None,
    a: Any,
    root: Path,
    device_name: str | None = None,
    kv_offload: bool = False,
) -> Engine:
    batches = [int(b) for b in split_list(a.batches)]
    cfg = EngineConfig(
        model_dir=str(model_dir),
        device=device_name or str(device),
        stream=StreamConfig(gpu_memory_bytes=gpu_memory),
        codec=CodecConfig(name=codec, cache_dir=str(root / "codecs")),
        limits=LimitsConfig(
            max_batch=max(batches),
            max_seq_len=a.prompt_len + a.new_tokens,
            max_new_tokens=a.new_tokens,
            max_prefill_tokens=max(batches) * a.prompt_len,
            kv_offload=kv_offload,
        ),
    )
    return Engine(cfg, tokenizer=TokenStandIn())


def kv_offload_rows(
    shape: str, model_dir: Path, codec: str, a: Any, device: torch.device, root: Path, link: LinkRates
) -> list[list]:
    """Decode with every block streamed and every layer's KV offloaded; KV bytes per pass as counted."""
    name = "cuda" if device.type == "cuda" else "emu"
    eng = open_engine(model_dir, device, codec, 0, a, root, device_name=name, kv_offload=True)
    packed, _dense = streamed_bytes(eng)
    rows = []
    for b in [int(x) for x in split_list(a.batches)]:
        seen: list[Any] = []
        step = eng.step
        eng.step = lambda step=step, seen=seen: seen.append(step()) or seen[-1]
        rate = decode_rate(eng, b, a, f"kv-{codec}")
        eng.step = step
        decode = [s for s in seen[1:] if s.decode_tokens]  # the timed passes (decode_rate's first: prefill)
        up = sum(s.kv_bytes_h2d for s in decode) / max(len(decode), 1)
        down = sum(s.kv_bytes_d2h for s in decode) / max(len(decode), 1)
        floor = decode_floor_tokens_per_s(b, link.h2d, packed + up)
        context = a.prompt_len + a.new_tokens
        rows.append(
            [shape, codec, b, context, name, rate, mb(packed), mb(up), mb(down), floor, ratio(rate, floor)]
        )
    del eng
    release(device)
    return rows


def streamed_bytes(eng: Engine) -> tuple[int, int]:
    """(packed bytes, dense stored-dtype bytes) of the blocks that stream in one pass."""
    st = eng.streamer
    packed = eng.codec_cache.block_nbytes if eng.codec_cache is not None else eng.store.block_nbytes
    return (
        sum(packed(i) for i in st.plan.streamed),
        sum(eng.store.block_nbytes(i) for i in st.plan.streamed),
    )


def host_path(eng: Engine) -> str:
    # The two host paths run at very different rates, so the tables say which one was measured.
    if eng.device.type != "cuda":
        return "cpu (no copy)"
    return {
        "none": "resident",
        "registered": "registered mmap",
        "staging": "pinned staging",
        "registered+staging": "registered mmap + staging",
    }[eng.streamer.host_path()]


@torch.inference_mode()
def streamer_rate(eng: Engine, passes: int) -> dict[str, Any]:
    st = eng.streamer
    packed, dense = streamed_bytes(eng)
    for _ in st.blocks():  # warm-up: page the files in, first decode kernels
        pass
    h0 = st.stats.h2d_bytes
    with Timer(eng.device) as t:
        for _ in range(passes):
            for _ in st.blocks():
                pass
    moved = st.stats.h2d_bytes - h0
    if moved == 0:  # the CPU streamer copies nothing: count the packed bytes it decoded
        moved = packed * passes
    return {
        "packed": packed,
        "dense": dense,
        "seconds": t.seconds / passes,
        "moved": moved,
        "rate": moved / max(t.seconds, 1e-12),
        "dense_rate": dense * passes / max(t.seconds, 1e-12),
    }


def decode_rate(eng: Engine, batch: int, a: Any, tag: str) -> float:
    """Decode tokens/s for `batch` token-id prompts: only the passes after the prefill are timed."""
    g = torch.Generator().manual_seed(batch)
    for k in range(batch):
        ids = torch.randint(1, eng.spec.vocab, (a.prompt_len,), generator=g).tolist()
        eng.submit(
            GenerateRequest(
                f"{tag}-{batch}-{k}",
                ids,
                SamplingParams(),
                StopParams(max_new_tokens=a.new_tokens, ignore_eos=True),
            )
        )
    first = eng.step()  # the prefill pass samples every first token
    if first.prefill_tokens != batch * a.prompt_len:
        raise RuntimeError(
            f"prefill pass carried {first.prefill_tokens} tokens, expected {batch * a.prompt_len}"
        )
    tokens = 0
    with Timer(eng.device) as t:
        while eng.has_work():
            tokens += eng.step().decode_tokens
    if tokens != batch * (a.new_tokens - 1):
        raise RuntimeError(f"decoded {tokens} tokens, expected {batch * (a.new_tokens - 1)}")
    return tokens / max(t.seconds, 1e-12)


def decode_rates(eng: Engine, batches: list[int], a: Any, tag: str) -> dict[int, float]:
    decode_rate(eng, 1, argparse.Namespace(prompt_len=a.prompt_len, new_tokens=2), f"{tag}-warm")
    return {b: decode_rate(eng, b, a, tag) for b in batches}


def run_shape(
    shape: str, a: Any, device: torch.device, root: Path, link: LinkRates
) -> tuple[list, list, list]:
    codecs, batches = split_list(a.codecs), [int(b) for b in split_list(a.batches)]
    model_dir = make_model(shape, a.layers, torch.bfloat16, root, device=device)
    log(f"{shape}: resident")
    eng = open_engine(model_dir, device, "none", None, a, root)
    resident = decode_rates(eng, batches, a, "res")
    del eng
    release(device)
    srows, drows = [], []
    for codec in codecs:
        log(f"{shape}: streamed, codec {codec}")
        eng = open_engine(model_dir, device, codec, 0, a, root)
        r = streamer_rate(eng, a.passes)
        path = host_path(eng)
        srows.append(
            [
                shape,
                codec,
                mb(r["packed"]),
                mb(r["dense"]),
                r["seconds"],
                r["rate"] / 1e9,
                link.h2d / 1e9,
                ratio(r["rate"], link.h2d),
                r["dense_rate"] / 1e9,
                path,
            ]
        )
        streamed = decode_rates(eng, batches, a, f"st-{codec}")
        for b in batches:
            floor = decode_floor_tokens_per_s(b, link.h2d, r["packed"])
            drows.append(
                [
                    shape,
                    codec,
                    b,
                    streamed[b],
                    resident[b],
                    floor,
                    ratio(streamed[b], floor),
                    ratio(streamed[b], resident[b]),
                    path,
                ]
            )
        eng.streamer.close()  # unregister the mmap before it goes away
        del eng
        release(device)
    krows = []
    if a.kv_offload:
        for codec in codecs:
            log(f"{shape}: streamed with KV offload, codec {codec}")
            krows += kv_offload_rows(shape, model_dir, codec, a, device, root, link)
    return srows, drows, krows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.cache) if a.cache else default_root()
    shapes = split_list(a.shape)
    print(f"# bench/stream.py  {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(machine_line(device) + "\n")
    link_bytes = a.link_mb << 20 if device.type == "cuda" else min(a.link_mb, 64) << 20
    link = measure_link(device, link_bytes)
    lrows, srows, drows = [[link.kind, link.h2d / 1e9, link.d2h / 1e9, link.both / 1e9]], [], []
    krows: list[list] = []
    for shape in shapes:
        s, d, k = run_shape(shape, a, device, root, link)
        srows += s
        drows += d
        krows += k
    print(table(LINK_TITLE, LINK_HEADERS, lrows))
    print(table(STREAMER_TITLE, STREAMER_HEADERS, srows))
    print(table(DECODE_TITLE, DECODE_HEADERS, drows))
    if a.kv_offload:
        print(table(KV_TITLE, KV_HEADERS, krows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
