"""The compiled CPU noise kernels (engine/noise_cpu.py via engine/fused.py) against the independent
numpy reference (noise_reference.py) and against zo.py's torch path, bit for bit.

The torch path is itself checked against hand-written float32 references in test_zo.py; comparing
the kernels with it here covers the cases those references do not spell out (stochastic rounding,
NaN/inf/overflow, odd lengths, several directions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zostream.engine import fused, rng, zo

from . import noise_reference as reference

pytestmark = pytest.mark.skipif(fused.noise_cpu is None, reason="numba is not installed")
KINDS = ["gaussian", "rademacher"]
BF16 = torch.bfloat16


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, with every NaN as one pattern: NaN payloads are not part of the contract (torch's
    own bf16 conversion writes 0xFFFF in its vector loop and 0x7FC0 in its scalar tail)."""
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch):
    """Run zo.py's chunked torch code instead of the kernels inside the `with` block."""

    class Ctx:
        def __enter__(self):
            monkeypatch.setattr(fused, "noise_cpu", None)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Ctx()


def theta_with_specials(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian values plus zeros, ±inf, NaN, huge (near bf16 max) and tiny values."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.38e38, -3.38e38, 1e-39, -1e-40]
    t[: len(special)] = torch.tensor(special)
    t[len(special) : 2 * len(special)] *= 1e-6  # steps of relative size 1e-3 and more: sub-ulp in bf16
    return t.to(dtype)


@pytest.mark.parametrize(
    "seed,name,start,count",
    [
        (9, "w", 0, 1 << 16),
        (123, "model.layers.7.mlp.up_proj.weight", 5, 40_001),
        (7, "e", 4 * 2**32 - 6, 13),
    ],
)
def test_generator_matches_independent_reference(seed: int, name: str, start: int, count: int):
    # The last case crosses counter 2**32 (its high word becomes 1).
    for kind, ref in (("gaussian", reference.normal), ("rademacher", reference.rademacher)):
        got = fused.noise(kind, seed, name, start, count).numpy()
        assert np.array_equal(got.view(np.uint32), ref(seed, name, start, count).view(np.uint32)), kind
    k0, k1 = rng.tensor_key(seed, name, 1)
    u = np.empty(count, np.float32)
    fused.noise_cpu.fill_uniform(k0, k1, start, u)
    assert np.array_equal(u, reference.uniform(seed, name, start, count))


def test_generator_edge_words():
    """Words at the ends of both transforms' ranges (u1 = 1 and 2**-24, octant and quadrant edges)
    through the kernel's Box-Muller pieces and the reference's, one by one."""
    edges = [0, 0xFF, 0x100, 0x1FF, 0xFFFFFF00, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000]
    edges += [(q << 30) + (r << 8) for q in range(4) for r in (0, 1, (1 << 21) - 1, 1 << 21, (1 << 21) + 1)]
    edges += list(np.random.default_rng(0).integers(0, 2**32, 500, dtype=np.uint64))
    words = np.array(edges, dtype=np.uint64)
    radius = np.sqrt(reference._neg2_log(words))
    sin, cos = reference._sincos(words)
    for i, w in enumerate(words):
        assert np.float32(fused.noise_cpu._radius(w)).view(np.uint32) == radius[i].view(np.uint32), hex(w)
        s, c = fused.noise_cpu._sincos(w)
        assert np.float32(s).view(np.uint32) == sin[i].view(np.uint32), hex(w)
        assert np.float32(c).view(np.uint32) == cos[i].view(np.uint32), hex(w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "dtype,out_dtype", [(torch.float32, torch.float32), (BF16, BF16), (BF16, torch.float32)]
)
@pytest.mark.parametrize("n", [1, 7, 4099])
def test_perturb_pair_matches_reference(kind: str, dtype: torch.dtype, out_dtype: torch.dtype, n: int):
    theta = theta_with_specials(n, dtype) if n > 20 else torch.randn(n).to(dtype)
    before = theta.clone()
    eps = 1e-3
    plus, minus = zo.perturbed_pair(theta, kind, 77, "blk.w", eps, out_dtype)
    assert torch.equal(bits(theta), bits(before))
    ref_z = reference.normal if kind == "gaussian" else reference.rademacher
    z = ref_z(77, "blk.w", 0, n)
    x = before.float().numpy()
    for out, s in ((plus, 1), (minus, -1)):
        want = torch.from_numpy(x + np.float32(s * eps) * z).to(out_dtype)
        assert out.dtype == out_dtype and torch.equal(bits(out), bits(want)), s
        assert torch.equal(bits(zo.perturbed(theta, kind, 77, "blk.w", eps, s, out_dtype)), bits(want))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "dtype,rounding", [(torch.float32, "nearest"), (BF16, "nearest"), (BF16, "stochastic")]
)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("decay", [False, True])
def test_update_matches_torch_path(
    torch_path, kind: str, dtype: torch.dtype, rounding: str, q: int, decay: bool
):
    n = 4099
    gs = [0.75, -2.5, 1e3][:q]
    dirs = [(rng.step_seed(3, 11, d), g) for d, g in enumerate(gs)]
    args = (dirs, 1e-2, 0.1, kind)
    kw = dict(decay=decay, rounding=rounding, sr_seed=rng.step_seed(3, 11, 0xFFFF))
    got = theta_with_specials(n, dtype, seed=q)
    want = got.clone()
    zo.apply_update(got, "blk.w", *args, **kw)
    with torch_path:
        zo.apply_update(want, "blk.w", *args, **kw)
    assert torch.equal(bits(got), bits(want))
    assert not torch.equal(bits(got), bits(theta_with_specials(n, dtype, seed=q)))


def test_stochastic_rounding_on_random_values(torch_path):
    """Every float32 bit pattern class near bf16 neighbours: random exponents and mantissas."""
    g = np.random.default_rng(1)
    x = g.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = torch.from_numpy(np.where(np.isfinite(x), x, np.float32(1.5)).copy())
    got = x.to(BF16)
    want = got.clone()
    dirs = [(5, 1.0)]
    zo.apply_update(got, "w", dirs, 1e-30, 0.0, "rademacher", decay=False, rounding="stochastic", sr_seed=9)
    with torch_path:
        zo.apply_update(
            want, "w", dirs, 1e-30, 0.0, "rademacher", decay=False, rounding="stochastic", sr_seed=9
        )
    assert torch.equal(bits(got), bits(want))


def test_thread_count_does_not_change_bits():
    theta = torch.randn((1 << 19) + 5)  # over fused._SPLIT_MIN per thread: split in two
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t = theta.to(BF16)
            zo.apply_update(
                t,
                "w",
                [(1, 0.5), (2, -1.0)],
                1e-2,
                0.1,
                "gaussian",
                decay=True,
                rounding="stochastic",
                sr_seed=4,
            )
            outs.append((t, *zo.perturbed_pair(theta, "gaussian", 8, "w", 1e-3, BF16)))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype,rounding", [(torch.float32, "nearest"), (BF16, "stochastic")])
@pytest.mark.parametrize("mask_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("q", [1, 3])
def test_masked_update_matches_torch_path(torch_path, dtype, rounding, mask_dtype, one_sided, q):
    """The update mask (zo.UpdateMask) in the kernel against the torch path, specials included; ε large
    enough against |θ| ~ 1 that some coordinates keep their term and small enough that others lose it."""
    n = 4099
    dirs = [(rng.step_seed(3, 11, d), g) for d, g in enumerate([0.75, -2.5, 1e3][:q])]
    mask = zo.UpdateMask(4e-3, mask_dtype, one_sided)
    kw = dict(decay=True, rounding=rounding, sr_seed=rng.step_seed(3, 11, 0xFFFF), mask=mask)
    got = theta_with_specials(n, dtype, seed=q)
    want, unmasked = got.clone(), got.clone()
    zo.apply_update(got, "blk.w", dirs, 1e-2, 0.1, "gaussian", **kw)
    with torch_path:
        zo.apply_update(want, "blk.w", dirs, 1e-2, 0.1, "gaussian", **kw)
        zo.apply_update(unmasked, "blk.w", dirs, 1e-2, 0.1, "gaussian", **{**kw, "mask": None})
    assert torch.equal(bits(got), bits(want))
    changed = int((bits(got) != bits(unmasked)).sum())
    if mask_dtype == BF16:
        assert changed > n // 10  # the mask is not vacuous
