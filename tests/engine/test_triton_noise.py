"""The Triton noise kernels (engine/noise_triton.py) against the independent numpy reference
(noise_reference.py) and the torch generator (rng.py), bit for bit.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which evaluates every
tl op with numpy on CPU tensors): that checks the kernels' integer and float32 operation sequence,
not the GPU code generator. For the latter, each kernel is compiled to a cubin for sm_90 with no
GPU present and its PTX is checked for fused multiply-adds; the CUDA test compares the GPU's
output with rng.py on the same device."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zostream.engine import fused, rng, zo

from . import noise_reference as reference

triton = pytest.importorskip("triton")
KINDS = ["gaussian", "rademacher"]
SOURCE = Path(__file__).resolve().parents[2] / "engine" / "noise_triton.py"
# (seed, name, start, count): aligned, unaligned on both ends, and a counter crossing 2**32.
RANGES = [(9, "w", 0, 4096), (123, "model.layers.7.mlp.up_proj.weight", 5, 3001), (7, "e", 4 * 2**32 - 6, 13)]


@pytest.fixture(scope="module")
def interp():
    """A private copy of engine/noise_triton.py whose kernels were decorated under TRITON_INTERPRET=1
    (triton.jit reads the setting when it decorates), leaving the package's module untouched."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("zostream.engine._noise_triton_interp", SOURCE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    yield module
    sys.modules.pop(spec.name, None)


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


@pytest.mark.parametrize("seed,name,start,count", RANGES)
@pytest.mark.parametrize("kind", KINDS)
def test_interpreted_noise_matches_reference_and_rng(interp, kind, seed, name, start, count):
    got = interp.noise(kind, seed, name, start, count, "cpu")
    ref = (reference.normal if kind == "gaussian" else reference.rademacher)(seed, name, start, count)
    assert got.dtype == torch.float32 and got.shape == (count,)
    np.testing.assert_array_equal(bits(got), ref.view(np.int32))
    np.testing.assert_array_equal(bits(got), bits(rng.noise(kind, seed, name, start + count, start, count)))


@pytest.mark.parametrize("seed,name,start,count", RANGES)
def test_interpreted_uniform_matches_reference_and_rng(interp, seed, name, start, count):
    got = interp.uniform(seed, name, start, count, "cpu")
    np.testing.assert_array_equal(bits(got), reference.uniform(seed, name, start, count).view(np.int32))
    np.testing.assert_array_equal(bits(got), bits(rng.uniform(seed, name, start, count, "cpu")))


def test_interpreted_empty_and_bad_range(interp):
    assert interp.noise("gaussian", 1, "w", 3, 0, "cpu").numel() == 0
    with pytest.raises(ValueError, match="start and count"):
        interp.noise("gaussian", 1, "w", -1, 4, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_interpreted_perturb_pair_matches_textbook(interp, kind, dtype):
    """out± against (θ ± ε z) written here in numpy from the reference z (float32, one rounding per op,
    then torch's round-to-nearest-even into dtype); odd length, θ of the output dtype."""
    n, seed, name, eps = 2051, 31, "model.layers.0.self_attn.q_proj.weight", zo.f32(1e-3)
    theta = (torch.randn(n, generator=torch.Generator().manual_seed(4)) * 0.05).to(dtype)
    plus, minus = interp.perturb_pair(theta, kind, seed, name, eps, dtype, pair=True)
    z = (reference.normal if kind == "gaussian" else reference.rademacher)(seed, name, 0, n)
    x = theta.float().numpy()
    dz = z * np.float32(eps)
    want_plus = torch.from_numpy(x + dz).to(dtype)
    want_minus = torch.from_numpy(x - dz).to(dtype)
    np.testing.assert_array_equal(bits(plus), bits(want_plus))
    np.testing.assert_array_equal(bits(minus), bits(want_minus))
    only, none = interp.perturb_pair(theta, kind, seed, name, eps, dtype, pair=False)
    assert none is None
    np.testing.assert_array_equal(bits(only), bits(want_plus))


def test_interpreted_perturb_pair_float32_master_to_bf16(interp):
    """A float32 master perturbed into bf16 copies equals zo.py's torch path (checked in test_zo.py)."""
    theta = torch.randn(1031, generator=torch.Generator().manual_seed(5))
    eps = zo.f32(1e-2)
    plus, minus = interp.perturb_pair(theta, "gaussian", 8, "w", eps, torch.bfloat16, pair=True)
    want = zo._perturbed_torch(theta, "gaussian", 8, "w", (eps, -eps), torch.bfloat16, 1 << 22)  # noqa: SLF001
    np.testing.assert_array_equal(bits(plus), bits(want[0]))
    np.testing.assert_array_equal(bits(minus), bits(want[1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_interpreted_perturb_pair_specials_match_torch_path(interp, dtype):
    """±inf, NaN, values that overflow bfloat16 after the step, tiny values: as zo.py's torch path."""
    theta = theta_with_specials(1029, dtype)
    eps = zo.f32(0.5)
    with np.errstate(invalid="ignore"):
        plus, minus = interp.perturb_pair(theta, "gaussian", 3, "w", eps, dtype, pair=True)
    want = zo._perturbed_torch(theta, "gaussian", 3, "w", (eps, -eps), dtype, 1 << 22)  # noqa: SLF001
    np.testing.assert_array_equal(bits(bits_t(plus)), bits(bits_t(want[0])))
    np.testing.assert_array_equal(bits(bits_t(minus)), bits(bits_t(want[1])))


def _compile(fn, signature: dict[str, str], constexprs: dict[str, int]):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})


def _compile_cases():
    from zostream.engine import noise_triton as nt

    fill_sig = {"out": "*fp32", "start": "i64", "count": "i64", "k0": "i64", "k1": "i64"}
    pair_sig = {"theta": "*bf16", "out_p": "*bf16", "out_m": "*bf16", "n": "i64", "k0": "i64", "k1": "i64"}
    pair_sig["scale"] = "fp32"
    for kind in (nt.GAUSSIAN, nt.RADEMACHER, nt.UNIFORM):
        yield f"fill-{kind}", nt.fill_kernel, fill_sig, {"KIND": kind, "BLOCK": nt.BLOCK}
    for kind in (nt.GAUSSIAN, nt.RADEMACHER):
        constexprs = {"KIND": kind, "PAIR": True, "BLOCK": nt.BLOCK}
        yield f"pair-{kind}", nt.perturb_pair_kernel, pair_sig, constexprs
    upd_sig = {
        "theta": "*bf16",
        "keys": "*i64",
        "gs": "*fp32",
        "q": "i32",
        "n": "i64",
        "lr": "fp32",
        "wd": "fp32",
    }
    upd_sig |= {"sk0": "i64", "sk1": "i64", "eps": "fp32"}
    for kind in (nt.GAUSSIAN, nt.RADEMACHER):
        constexprs = {
            "KIND": kind,
            "DECAY": True,
            "STOCHASTIC": True,
            "MASK": 0,
            "MASK_DT": 0,
            "BLOCK": nt.BLOCK,
        }
        yield f"update-{kind}", nt.update_kernel, upd_sig, constexprs
    pairs_sig = {"theta": "*fp32", "out_p": "*fp32", "out_m": "*fp32", "tensors": "*i64", "programs": "*i64"}
    pairs_sig["scale"] = "fp32"
    constexprs = {"KIND": nt.GAUSSIAN, "PAIR": True, "BLOCK": nt.BLOCK}
    yield "pairs-multi-tensor", nt.perturb_pairs_kernel, pairs_sig, constexprs
    for mask, mask_dt in ((1, 1), (2, 2)):  # pair in bf16, one-sided in fp16
        constexprs = {
            "KIND": nt.GAUSSIAN,
            "DECAY": True,
            "STOCHASTIC": True,
            "MASK": mask,
            "MASK_DT": mask_dt,
        }
        yield f"update-mask-{mask}", nt.update_kernel, upd_sig, {**constexprs, "BLOCK": nt.BLOCK}


@pytest.mark.parametrize("case", range(10))
def test_kernels_compile_for_sm90_without_fma(case):
    """Each kernel builds a cubin for sm_90 with no GPU present; with fusion off its PTX holds no
    fused multiply-add (an fma would round a*b+c once, the reference rounds twice) and its division
    and square root are the correctly rounded forms."""
    pytest.importorskip("triton.backends.nvidia")
    label, fn, sig, constexprs = list(_compile_cases())[case]
    compiled = _compile(fn, sig, constexprs)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    assert len(cubin) > 0, label
    assert "fma.rn.f32" not in ptx and "fma.rn.ftz.f32" not in ptx, label
    assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx, label
    assert "sqrt.approx" not in ptx, label
    if constexprs["KIND"] == 0:
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx, label


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernels_match_rng_on_device(kind):
    from zostream.engine import noise_triton as nt

    for seed, name, start, count in RANGES + [(3, "big", 12345, 1 << 20)]:
        got = nt.noise(kind, seed, name, start, count, "cuda")
        want = rng.noise(kind, seed, name, start + count, start, count, device="cuda")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (kind, name)
        cpu = reference.normal if kind == "gaussian" else reference.rademacher
        np.testing.assert_array_equal(bits(got), cpu(seed, name, start, count).view(np.int32))
    u = nt.uniform(5, "w", 3, 100_001, "cuda")
    assert torch.equal(u.view(torch.int32), rng.uniform(5, "w", 3, 100_001, "cuda").view(torch.int32))
    theta = torch.randn(1 << 20, device="cuda").to(torch.bfloat16)
    eps = zo.f32(1e-3)
    for out_dtype in (torch.float32, torch.bfloat16):
        plus, minus = nt.perturb_pair(theta, kind, 9, "w", eps, out_dtype, pair=True)
        want = zo._perturbed_torch(theta, kind, 9, "w", (eps, -eps), out_dtype, 1 << 22)  # noqa: SLF001
        assert torch.equal(bits_t(plus), bits_t(want[0])) and torch.equal(bits_t(minus), bits_t(want[1]))
    # zo.py's dispatch takes the Triton kernel for a CUDA tensor (engine/fused.py)
    assert fused.triton_ready(theta)
    p2, m2 = zo.perturbed_pair(theta, kind, 9, "w", 1e-3, torch.bfloat16)
    assert torch.equal(bits_t(p2), bits_t(want[0])) and torch.equal(bits_t(m2), bits_t(want[1]))
    # the fused update, stochastic rounding and decay included, against the torch path on the device
    for dtype, stochastic in ((torch.bfloat16, True), (torch.float32, False)):
        coefs = [(11, zo.f32(0.5)), (12, zo.f32(-1.25)), (13, zo.f32(3.0))]
        fast, slow = theta.to(dtype).clone(), theta.to(dtype).clone()
        nt.update(fast, "w", coefs, zo.f32(0.02), zo.f32(0.01), kind, stochastic, 77)
        zo._update_torch(slow, "w", coefs, zo.f32(0.02), zo.f32(0.01), kind, True, stochastic, 77, 1 << 22)  # noqa: SLF001
        assert torch.equal(bits_t(fast), bits_t(slow)), dtype


def bits_t(t: torch.Tensor) -> torch.Tensor:
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).contiguous()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def theta_with_specials(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian values plus zeros, ±inf, NaN, values near bfloat16's max and tiny values."""
    t = torch.randn(n, generator=torch.Generator().manual_seed(6)) * 0.05
    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.38e38, -3.38e38, 1e-39, -1e-40]
    t[: len(special)] = torch.tensor(special)
    t[len(special) : 2 * len(special)] *= 1e-6
    return t.to(dtype)


UPDATE_CASES = [
    # (dtype, kind, directions, wd, stochastic)
    (torch.bfloat16, "gaussian", [(11, 0.5)], 0.0, True),
    (torch.bfloat16, "gaussian", [(11, 0.5), (12, -1.25), (13, 3.0)], 0.01, True),
    (torch.bfloat16, "rademacher", [(11, 0.5), (12, -1.25)], 0.0, False),
    (torch.float32, "gaussian", [(11, 0.5), (12, -1.25), (13, 3.0)], 0.01, False),
    (torch.float16, "gaussian", [(11, 2.0), (14, -0.75)], 0.1, False),
]


@pytest.mark.parametrize("case", range(len(UPDATE_CASES)))
def test_interpreted_update_matches_torch_path(interp, case):
    """The fused update against zo.py's chunked torch path (the specification; test_zo.py checks it
    against hand-written float32 references), specials included, q = 1 and q > 1, odd length."""
    dtype, kind, directions, wd, stochastic = UPDATE_CASES[case]
    name, lr, sr_seed = "model.layers.1.mlp.down_proj.weight", zo.f32(0.02), 77
    coefs = [(s, zo.f32(g)) for s, g in directions]
    theta = theta_with_specials(2053, dtype)
    before, want = theta.clone(), theta.clone()
    with np.errstate(invalid="ignore"):  # inf - inf and the NaN element, as in torch
        zo._update_torch(want, name, coefs, lr, zo.f32(wd), kind, wd != 0.0, stochastic, sr_seed, 1000)  # noqa: SLF001
        interp.update(theta, name, coefs, lr, zo.f32(wd), kind, stochastic, sr_seed)
    assert (bits_t(want) != bits_t(before)).sum() > 1000  # the step moved most elements
    np.testing.assert_array_equal(bits(bits_t(theta)), bits(bits_t(want)))


@pytest.mark.parametrize("dtype,stochastic", [(torch.bfloat16, True), (torch.float32, False)])
@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("one_sided", [False, True])
def test_interpreted_masked_update_matches_torch_path(interp, dtype, stochastic, mask_dtype, one_sided):
    """The update mask (zo.UpdateMask) in the Triton kernel against zo.py's torch path, q = 2."""
    name, lr, sr_seed = "model.layers.1.mlp.down_proj.weight", zo.f32(0.02), 77
    coefs = [(11, zo.f32(0.5)), (12, zo.f32(-1.25))]
    mask = zo.UpdateMask(1e-3, mask_dtype, one_sided)
    theta = (theta_with_specials(2053, torch.float32) * 20).to(dtype)  # |θ| ~ 1: ε z vanishes for some
    want = theta.clone()
    with np.errstate(invalid="ignore", over="ignore"):
        zo._update_torch(
            want, name, coefs, lr, zo.f32(0.01), "gaussian", True, stochastic, sr_seed, 1000, mask
        )  # noqa: SLF001
        interp.update(theta, name, coefs, lr, zo.f32(0.01), "gaussian", stochastic, sr_seed, mask)
    np.testing.assert_array_equal(bits(bits_t(theta)), bits(bits_t(want)))


# LoRA-like tensors of one layer: sizes 0, 1, odd, one not a multiple of 4, one spanning several programs.
MULTI_SHAPES = [(8, 64), (0,), (1,), (3, 7), (64, 8), (2051,), (5000,)]


@pytest.mark.parametrize(
    "dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
)
@pytest.mark.parametrize("pair", [True, False])
def test_interpreted_multi_tensor_pairs_match_one_launch_each(interp, dtype, out_dtype, pair):
    """One launch over a table of tensors gives each tensor the bits of its own perturb_pair launch, and
    (first tensor) those of θ ± ε z written here in numpy from the reference z."""
    g = torch.Generator().manual_seed(8)
    thetas = [(torch.randn(s, generator=g) * 0.05).to(dtype) for s in MULTI_SHAPES]
    names = [f"base_model.model.model.layers.3.t{j}.lora_A.weight" for j in range(len(thetas))]
    eps, seed = zo.f32(1e-3), 41
    keys = [rng.tensor_key(seed, n, 0) for n in names]
    got = interp.perturb_pairs(thetas, "gaussian", keys, eps, out_dtype, pair)
    for t, n, (plus, minus) in zip(thetas, names, got, strict=True):
        want_p, want_m = interp.perturb_pair(t, "gaussian", seed, n, eps, out_dtype, pair=pair)
        assert plus.shape == (t.numel(),)
        np.testing.assert_array_equal(bits(plus), bits(want_p))
        assert (minus is None) == (not pair)
        if pair:
            np.testing.assert_array_equal(bits(minus), bits(want_m))
    z = reference.normal(seed, names[0], 0, thetas[0].numel())
    x = thetas[0].float().reshape(-1).numpy()
    np.testing.assert_array_equal(
        bits(got[0][0]), bits(torch.from_numpy(x + z * np.float32(eps)).to(out_dtype))
    )


def test_lora_pass_takes_one_launch_per_direction(interp, monkeypatch):
    """PassPerturbation's LoRA group goes through the multi-tensor kernel where Triton runs (here: the
    interpreter standing in for CUDA), one launch per direction, with the per-tensor path's bits."""
    from zostream.engine.perturb import PassPerturbation

    g = torch.Generator().manual_seed(9)
    named = {
        f"base_model.model.model.layers.0.m{j}.weight": torch.randn(s, generator=g)
        for j, s in enumerate(MULTI_SHAPES)
    }
    seeds = [101, 102]
    want = PassPerturbation(seeds, "gaussian", 1e-3, torch.float32, str)._pairs(named, torch.float32)
    launches = []
    real = interp.perturb_pairs

    def counted(*a, **kw):
        launches.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(interp, "perturb_pairs", counted)
    monkeypatch.setattr(fused, "_noise_triton", interp)
    monkeypatch.setattr(fused, "triton_ready", lambda *ts: True)
    got = PassPerturbation(seeds, "gaussian", 1e-3, torch.float32, str)._pairs(
        named, torch.float32, multi=True
    )
    assert len(launches) == len(seeds)
    for d in range(len(seeds)):
        for sign in (0, 1):
            assert got[d][sign].keys() == named.keys()
            for n in named:
                assert got[d][sign][n].shape == named[n].shape
                np.testing.assert_array_equal(bits(got[d][sign][n]), bits(want[d][sign][n]))
