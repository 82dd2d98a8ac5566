"""Transfer codecs: packed layout, round trips against the quantisers' definitions, the disk cache."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_model
from zostream.engine import codecs
from zostream.engine.codec_cache import CodecCache, default_cache_root, open_codec_cache
from zostream.engine.codecs import (
    Int8Codec,
    NF4Codec,
    NoneCodec,
    block_layout,
    decode_block,
    encode_block,
    encodes,
    get_codec,
)
from zostream.engine.config import CodecConfig
from zostream.engine.store import WeightStore

CPU = torch.device("cpu")
# NF4 code values as published with QLoRA (Dettmers et al. 2023, appendix E), sorted: the
# reference the packed nibbles must index into, written out here rather than read from bnb.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
# Half the widest gap between neighbouring NF4 values (-1.0 .. -0.6962): the worst rounding error of
# x / absmax in [-1, 1]; the table ends at exactly -1 and +1, so no value lies outside its range.
NF4_RADIUS = (1.0 - 0.6961928009986877) / 2
LLAMA_LINEAR = {f"self_attn.{m}_proj.weight" for m in "qkvo"}
LLAMA_LINEAR |= {f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
# (shape, blocksize): blocks that span rows (C < bs, C % bs != 0), a partial last block (n % bs != 0),
# a single block smaller than bs, and one 2-row weight.
SHAPES = [((32, 32), 64), ((7, 130), 64), ((3, 50), 128), ((5, 6), 64), ((2, 256), 64), ((64, 96), 256)]


def _blocks_of(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Per-element block index of the row-major flat order."""
    return torch.arange(x.numel()) // bs


def _ref_absmax(x: torch.Tensor, bs: int) -> torch.Tensor:
    flat = x.reshape(-1).float().abs()
    nb = -(-flat.numel() // bs)
    return torch.zeros(nb).scatter_reduce(0, _blocks_of(x, bs), flat, "amax")


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _check_definition(x, idx, absmax, table, bs: int, y: torch.Tensor, slack: float = 1e-6) -> None:
    """The packed form is the blockwise-absmax quantiser by definition, checked element by element:
    absmax is the block's max |x|, each index is a nearest code of x / absmax (within `slack`), and
    the decoded value is exactly table[index] * absmax (fp32 product, as the kernels compute it)."""
    xf = x.reshape(-1).float()
    torch.testing.assert_close(absmax, _ref_absmax(x, bs), rtol=0, atol=0)
    scale = absmax[_blocks_of(x, bs)]
    scaled = xf / scale
    dist = (scaled[:, None] - table[None, :]).abs()
    chosen = dist.gather(1, idx[:, None].long())[:, 0]
    assert (chosen <= dist.min(1).values + slack).all(), "an element was not rounded to a nearest code value"
    torch.testing.assert_close(y.reshape(-1), table[idx.long()] * scale, rtol=0, atol=0)


def _radius(table: torch.Tensor) -> float:
    """Largest distance from any point of [-1, 1] to its nearest code value: half the widest gap
    between neighbours, or the uncovered end of the interval if the table stops short of +-1."""
    t = table.sort().values
    return max(float((t[1:] - t[:-1]).max()) / 2, 1 - float(t[-1]), 1 + float(t[0]))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> WeightStore:
    return WeightStore(make_tiny_model(tmp_path_factory.mktemp("m"), "llama"))


def test_encodes_only_linear_weights_inside_blocks(llama):
    block = llama.block(0)
    assert {n for n, t in block.items() if encodes(n, tuple(t.shape))} == LLAMA_LINEAR
    for name in ("fc1.weight", "fc2.weight", "self_attn.out_proj.weight", "mlp.gate_proj.weight"):
        assert encodes(name, (64, 32))
    for name, shape in [
        ("input_layernorm.weight", (32,)),
        ("self_attn.q_norm.weight", (16,)),
        ("self_attn.q_proj.bias", (32,)),
        ("fc1.bias", (64,)),
        ("model.embed_tokens.weight", (101, 32)),
        ("embed_positions.weight", (130, 32)),
        ("lm_head.weight", (101, 32)),
        ("final_layer_norm.weight", (32,)),
        ("ln_1.weight", (32, 32)),
        ("mlp.up_proj.weight", (64, 33)),  # odd last dim: nf4 packs two per byte along rows
        ("mlp.up_proj.weight", (4, 8, 8)),
    ]:
        assert not encodes(name, shape), name


def test_none_codec_is_the_identity():
    x = torch.randn(6, 10, dtype=torch.bfloat16)
    codec = get_codec(CodecConfig("none"))
    assert isinstance(codec, NoneCodec) and not codec.lossy
    packed = codec.encode(x)
    assert set(packed) == {"raw"} and packed["raw"] is x
    assert codec.packed_nbytes((6, 10), torch.bfloat16) == _nbytes(packed) == 120
    y = codec.decode(packed, CPU, torch.float32)
    assert y.dtype == torch.float32 and torch.equal(y, x.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "bs"), SHAPES)
def test_nf4_round_trip_matches_the_nf4_definition(shape, bs, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.3).to(dtype)
    codec = NF4Codec(bs)
    packed = codec.encode(x)
    n = x.numel()
    assert set(packed) == {"q", "absmax"}
    assert packed["q"].dtype == torch.uint8 and packed["q"].shape == (shape[0], shape[1] // 2)
    assert packed["absmax"].dtype == torch.float32 and packed["absmax"].shape == (math.ceil(n / bs),)
    q = packed["q"].reshape(-1)
    idx = torch.stack([q >> 4, q & 0xF], 1).reshape(-1)  # high nibble first, as bitsandbytes packs
    y = codec.decode(packed, CPU, torch.float32)
    assert y.shape == shape and y.dtype == torch.float32
    _check_definition(x, idx, packed["absmax"], NF4, bs, y)
    # Hence the error bound: |x - y| <= absmax_block * NF4_RADIUS.
    assert _radius(NF4) == pytest.approx(NF4_RADIUS)
    bound = packed["absmax"][_blocks_of(x, bs)] * NF4_RADIUS * (1 + 1e-6)
    assert ((x.reshape(-1).float() - y.reshape(-1)).abs() <= bound).all()
    # Other compute dtypes: the same fp32 values, rounded once.
    y16 = codec.decode(packed, CPU, torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("shape", "bs"), SHAPES)
def test_int8_round_trip_matches_blockwise_dynamic_quantisation(shape, bs, dtype):
    import bitsandbytes.functional as F

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.3).to(dtype)
    codec = Int8Codec(bs)
    packed = codec.encode(x)
    assert packed["q"].dtype == torch.uint8 and packed["q"].shape == shape
    assert packed["absmax"].shape == (math.ceil(x.numel() / bs),)
    table = F.create_dynamic_map(signed=True)  # bnb's 8-bit dynamic tree map: 256 sorted values in [-1, 1]
    y = codec.decode(packed, CPU, torch.float32)
    assert y.shape == shape and y.dtype == torch.float32
    # bnb's 8-bit CPU search misses the nearest code for ~0.2% of values lying within ~3e-5 of the
    # midpoint between two codes (measured max 2.8e-5 of absmax); that cannot move the bound below.
    _check_definition(x, packed["q"].reshape(-1), packed["absmax"], table, bs, y, slack=5e-5)
    # The dynamic map is densest near 0 and coarsest near +-1 (gap 0.0141, max 1.0, min -0.9930),
    # so its covering radius is 0.00703, + 5e-5 slack < 1/127: never worse than symmetric linear int8.
    assert _radius(table) + 5e-5 < 1 / 127
    bound = packed["absmax"][_blocks_of(x, bs)] / 127
    assert ((x.reshape(-1).float() - y.reshape(-1)).abs() <= bound).all()
    torch.testing.assert_close(codec.decode(packed, CPU, torch.float16), y.half(), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Int8Codec, NF4Codec])
def test_chunked_encode_equals_whole_tensor_encode(cls):
    x = torch.randn(40, 100, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)  # 4000 elems
    whole = cls(64).encode(x)
    chunked = cls(64, chunk_elems=128)  # 32 chunks, the last one partial and ending mid-block
    assert cls(64).chunk_elems == codecs.CHUNK_ELEMS == 1 << 26
    for part, t in chunked.encode(x).items():
        assert torch.equal(t, whole[part]), part
    with pytest.raises(ValueError, match="multiple of 2 \\* blocksize"):
        cls(64, chunk_elems=96)


@pytest.mark.parametrize(
    ("shape", "bs"), [((4096, 4096), 64), ((7, 130), 64), ((3, 50), 128), ((1100, 512), 256)]
)
def test_packed_nbytes_formula(shape, bs):
    n, nb = math.prod(shape), math.ceil(math.prod(shape) / bs)
    nf4, int8 = NF4Codec(bs), Int8Codec(bs)
    assert nf4.packed_nbytes(shape, torch.bfloat16) == n // 2 + 4 * nb  # two codes per byte + fp32 absmax
    assert int8.packed_nbytes(shape, torch.bfloat16) == n + 4 * nb
    assert NoneCodec().packed_nbytes(shape, torch.bfloat16) == 2 * n
    if n < 10**6:  # the formula is what encode really produces
        x = torch.randn(shape).to(torch.bfloat16)
        assert _nbytes(nf4.encode(x)) == nf4.packed_nbytes(shape, torch.bfloat16)
        assert _nbytes(int8.encode(x)) == int8.packed_nbytes(shape, torch.bfloat16)
    if shape == (4096, 4096):  # nf4 at bs 64 is 4.5 bits per weight: 3.56x less than bf16
        assert nf4.packed_nbytes(shape, torch.bfloat16) / (2 * n) == 0.28125


@pytest.mark.parametrize(("model", "dtype"), [("llama", torch.float32), ("qwen2", torch.bfloat16)])
@pytest.mark.parametrize("name", ["none", "int8", "nf4"])
def test_block_round_trip(tmp_path, model, dtype, name):
    store = WeightStore(make_tiny_model(tmp_path, model, dtype=dtype))
    codec = get_codec(CodecConfig(name, blocksize=64))
    block = store.block(1)
    packed = encode_block(codec, block)
    dense = {k: (tuple(t.shape), t.dtype) for k, t in block.items()}
    assert {k: (tuple(t.shape), t.dtype) for k, t in packed.items()} == block_layout(codec, dense)
    assert all(t.device == CPU for t in packed.values())
    for local, t in block.items():  # norms / biases pass through untouched as "::raw"
        if not encodes(local, tuple(t.shape)):
            assert torch.equal(packed[f"{local}::raw"], t)
    out = decode_block(codec, packed, CPU, torch.float32)
    assert set(out) == set(block)
    radius = {"none": 0.0, "int8": 1 / 127, "nf4": NF4_RADIUS}[name]
    for local, t in block.items():
        assert out[local].shape == t.shape and out[local].dtype == torch.float32
        err = (out[local] - t.float()).abs().max()
        if name == "none" or not encodes(local, tuple(t.shape)):
            assert err == 0, local
        else:  # per-element bounds are checked above; the tensor-wide max |x| bounds every block's absmax
            assert 0 < err <= t.float().abs().max() * radius * (1 + 1e-6), local
    out16 = decode_block(codec, packed, CPU, torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 and v.shape == block[k].shape for k, v in out16.items())


def _cfg(root: Path, name: str = "nf4", bs: int = 64) -> CodecConfig:
    return CodecConfig(name, blocksize=bs, cache_dir=str(root))


def _count_encodes(monkeypatch, cls) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    original = cls.encode

    def counting(self, t, device=None):
        calls.append(tuple(t.shape))
        return original(self, t, device)

    monkeypatch.setattr(cls, "encode", counting)
    return calls


def test_cache_builds_then_reuses_without_encoding(llama, tmp_path, monkeypatch, capsys):
    cache = open_codec_cache(llama, _cfg(tmp_path), progress=False)
    assert cache is not None and cache.ready()
    assert cache.dir == tmp_path / llama.fingerprint / "nf4-b64"
    assert "encoding llama-0-float32 with nf4 into" in capsys.readouterr().err
    files = sorted(p.name for p in cache.dir.iterdir())
    assert files == [f"block_{i:05d}.safetensors" for i in range(3)] + ["manifest.json"]
    codec = NF4Codec(64)
    for i in range(llama.num_layers):
        want = encode_block(codec, llama.block(i))
        got = cache.block(i)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert cache.block_nbytes(i) == _nbytes(want)
        assert cache.block_nbytes(i) == sum(
            codec.packed_nbytes(tuple(t.shape), t.dtype) if encodes(k, tuple(t.shape)) else t.nbytes
            for k, t in llama.block(i).items()
        )

    def boom(self, t, device=None):
        raise AssertionError("a ready cache must not re-encode")

    monkeypatch.setattr(NF4Codec, "encode", boom)
    again = open_codec_cache(llama, _cfg(tmp_path), progress=False)
    assert again is not None and again.dir == cache.dir
    assert "encoding" not in capsys.readouterr().err
    assert all(torch.equal(again.block(2)[k], v) for k, v in cache.block(2).items())


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_torn_cache_rebuilds_only_the_damaged_block(llama, tmp_path, monkeypatch, damage):
    cache = open_codec_cache(llama, _cfg(tmp_path, "int8"), progress=False)
    assert cache is not None
    before = {i: cache.block_path(i).stat() for i in range(3)}
    want = {k: v.clone() for k, v in cache.block(1).items()}
    cache.manifest_path.unlink()  # a crash before the manifest: the cache is not ready
    path = cache.block_path(1)
    if damage == "deleted":
        path.unlink()
    else:
        os.truncate(path, path.stat().st_size // 2)
    assert not CodecCache(tmp_path, llama.fingerprint, Int8Codec(64), 64).ready()
    calls = _count_encodes(monkeypatch, Int8Codec)
    again = open_codec_cache(llama, _cfg(tmp_path, "int8"), progress=False)
    assert again is not None and again.ready()
    assert len(calls) == len(LLAMA_LINEAR)  # one block's linear weights, nothing else
    for i in (0, 2):  # untouched: same inode, same mtime
        st = again.block_path(i).stat()
        assert (st.st_ino, st.st_mtime_ns) == (before[i].st_ino, before[i].st_mtime_ns)
    got = again.block(1)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_cache_key_is_fingerprint_codec_and_blocksize(llama, tmp_path, monkeypatch):
    other = WeightStore(make_tiny_model(tmp_path, "llama", seed=1))
    assert other.fingerprint != llama.fingerprint
    first = open_codec_cache(llama, _cfg(tmp_path), progress=False)
    calls = _count_encodes(monkeypatch, NF4Codec)
    second = open_codec_cache(other, _cfg(tmp_path), progress=False)
    assert first is not None and second is not None and first.dir != second.dir
    assert len(calls) == 3 * len(LLAMA_LINEAR)  # nothing reused across models
    assert not torch.equal(first.block(0)["mlp.up_proj.weight::q"], second.block(0)["mlp.up_proj.weight::q"])
    for cfg in (_cfg(tmp_path, "int8"), _cfg(tmp_path, "nf4", 128)):
        c = CodecCache(tmp_path, llama.fingerprint, get_codec(cfg), cfg.blocksize)
        assert c.dir.parent == first.dir.parent and c.dir != first.dir and not c.ready()
    with pytest.raises(ValueError, match="fingerprint"):
        CodecCache(tmp_path, "0" * 32, NF4Codec(64), 64).build(llama, progress=False)
    with pytest.raises(ValueError, match="blocksize"):
        CodecCache(tmp_path, llama.fingerprint, NF4Codec(64), 128)


def test_cache_with_a_different_code_table_is_not_ready(llama, tmp_path, monkeypatch):
    cache = open_codec_cache(llama, _cfg(tmp_path), progress=False)
    assert cache is not None and cache.ready()
    monkeypatch.setattr(NF4Codec, "table_digest", lambda self: "another-table")
    assert not CodecCache(tmp_path, llama.fingerprint, NF4Codec(64), 64).ready()


def test_no_cache_for_none_and_default_root(llama, tmp_path, monkeypatch):
    assert open_codec_cache(llama, _cfg(tmp_path, "none")) is None
    monkeypatch.setenv("ZOSTREAM_CACHE_DIR", str(tmp_path / "zc"))
    assert default_cache_root() == tmp_path / "zc" / "codecs"
    with pytest.raises(Exception, match="not built"):
        CodecCache(tmp_path, llama.fingerprint, NF4Codec(64), 64).block(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [Int8Codec, NF4Codec])
def test_cuda_encode_and_decode_agree_with_cpu(cls):
    """The CUDA kernels implement the same flat-block quantiser: decoding on the GPU gives the
    CPU's values, and encoding there gives the definition's absmax and nearest codes."""
    dev = torch.device("cuda")
    x = torch.randn(96, 200, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    codec = cls(64, chunk_elems=1024)
    cpu = codec.encode(x)
    y_cpu = codec.decode(cpu, CPU, torch.float32)
    y_gpu = codec.decode({k: v.to(dev) for k, v in cpu.items()}, dev, torch.float32)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=0)
    gpu = codec.encode(x, device=dev)
    assert all(t.device == CPU for t in gpu.values())
    torch.testing.assert_close(gpu["absmax"], cpu["absmax"], rtol=0, atol=0)
    y2 = codec.decode(gpu, CPU, torch.float32)
    if cls is NF4Codec:
        q = gpu["q"].reshape(-1)
        idx, table = torch.stack([q >> 4, q & 0xF], 1).reshape(-1), NF4
    else:
        import bitsandbytes.functional as F

        idx, table = gpu["q"].reshape(-1), F.create_dynamic_map(signed=True)
    _check_definition(x, idx, gpu["absmax"], table, 64, y2, slack=5e-5)
