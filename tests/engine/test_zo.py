"""zo: perturbation and update vs hand-written float32 references, chunk independence, stochastic
rounding (neighbours, unbiasedness, 1e-3-ulp updates survive), LR schedules, divergence guard."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from zostream.engine import climb, rng, schedule, zo

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KINDS = ["gaussian", "rademacher"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer bit patterns of a float tensor, for bitwise comparison."""
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def _theta(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


# ---------------------------------------------------------------- perturbed


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sign", [1, -1])
def test_perturbed_matches_reference_and_leaves_theta(kind: str, dtype: torch.dtype, sign: int):
    theta = _theta((37, 53), dtype)
    before = theta.clone()
    eps = 1e-3
    out = zo.perturbed(theta, kind, 1234, "layers.0.q_proj.weight", eps, sign, dtype)
    assert torch.equal(_bits(theta), _bits(before))
    assert out.shape == theta.shape and out.dtype == dtype
    # Reference in numpy float32: theta + (sign * eps) * z, one rounding per op.
    z = rng.noise(kind, 1234, "layers.0.q_proj.weight", theta.numel()).numpy()
    ref = before.float().numpy().reshape(-1) + np.float32(sign * eps) * z
    expected = torch.from_numpy(ref).to(dtype).view(theta.shape)
    assert torch.equal(_bits(out), _bits(expected))
    assert not torch.equal(out, theta)


@pytest.mark.parametrize("kind", KINDS)
def test_perturbed_chunk_independent_and_out_dtype(kind: str):
    theta = _theta((101, 3), torch.bfloat16)
    whole = zo.perturbed(theta, kind, 5, "w", 1e-2, -1, torch.float32)
    for chunk in (1, 7, 100, 4096):
        assert torch.equal(
            _bits(zo.perturbed(theta, kind, 5, "w", 1e-2, -1, torch.float32, chunk)), _bits(whole)
        )
    # Non-contiguous input: same values as its contiguous copy.
    t = _theta((40, 30), torch.float32)
    assert torch.equal(
        zo.perturbed(t.t(), kind, 5, "w", 1e-2, 1, torch.float32),
        zo.perturbed(t.t().contiguous(), kind, 5, "w", 1e-2, 1, torch.float32),
    )


def test_perturbed_validation():
    theta = torch.zeros(4)
    with pytest.raises(ValueError, match="sign"):
        zo.perturbed(theta, "gaussian", 1, "w", 1e-3, 0, torch.float32)
    with pytest.raises(ValueError, match="eps"):
        zo.perturbed(theta, "gaussian", 1, "w", 0.0, 1, torch.float32)
    with pytest.raises(ValueError, match="gaussian, rademacher"):
        zo.perturbed(theta, "sparse", 1, "w", 1e-3, 1, torch.float32)


# ---------------------------------------------------------------- projected_grad


def test_projected_grad():
    assert zo.projected_grad(3.0, 1.0, 0.5) == 2.0
    # float64 difference then one rounding to float32.
    lp, lm, eps = 2.3025851249694824, 2.3025848865509033, 1e-3
    assert zo.projected_grad(lp, lm, eps) == float(np.float32((lp - lm) / (2 * eps)))
    assert zo.projected_grad(1.0, 2.0, 1e-3) == float(np.float32(-500.0))
    assert math.isnan(zo.projected_grad(float("nan"), 1.0, 1e-3))
    assert zo.projected_grad(1e300, 0.0, 1e-3) == math.inf
    with pytest.raises(ValueError, match="eps"):
        zo.projected_grad(1.0, 1.0, -1e-3)


# ---------------------------------------------------------------- apply_update (nearest)


def reference_update(
    theta: np.ndarray, zs: list[np.ndarray], gs: list[float], lr: float, wd: float, decay: bool
) -> np.ndarray:
    """Textbook per-element loop in float32 scalars: θ - lr (Σ g_d z_d / q + wd θ)."""
    f = np.float32
    out = np.empty_like(theta, dtype=np.float32)
    for i in range(theta.size):
        upd = f(0)
        for d, (z, g) in enumerate(zip(zs, gs, strict=True)):
            term = f(g) * z[i]
            upd = term if d == 0 else f(upd + term)
        if len(gs) > 1:
            upd = f(upd / f(len(gs)))
        if decay:
            upd = f(upd + f(theta[i] * f(wd)))
        out[i] = f(theta[i] - f(upd * f(lr)))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [False, True])
def test_apply_update_matches_reference_loop(kind: str, dtype: torch.dtype, decay: bool):
    theta = _theta((3, 7), dtype, seed=1)
    before = theta.float().numpy().reshape(-1).copy()
    directions = [(rng.step_seed(9, 4, d), g) for d, g in enumerate([0.75, -2.5, 0.1])]
    lr, wd = 1e-2, 0.1
    zo.apply_update(theta, "h.0.mlp.w", directions, lr, wd, kind, decay=decay)
    zs = [rng.noise(kind, s, "h.0.mlp.w", theta.numel()).numpy() for s, _ in directions]
    ref = reference_update(before, zs, [g for _, g in directions], lr, wd, decay)
    expected = torch.from_numpy(ref).to(dtype).view(theta.shape)
    assert torch.equal(_bits(theta), _bits(expected))


def test_apply_update_single_direction_and_decay_flag():
    theta0 = _theta((64,), torch.float32, seed=2)
    seed = rng.step_seed(1, 0)
    z = rng.normal(seed, "w", 0, 64, "cpu").numpy()
    ref = reference_update(theta0.numpy(), [z], [0.3], 1e-3, 0.5, decay=False)
    a = theta0.clone()
    zo.apply_update(a, "w", [(seed, 0.3)], 1e-3, 0.5, "gaussian", decay=False)
    assert torch.equal(a, torch.from_numpy(ref))
    b = theta0.clone()
    zo.apply_update(b, "w", [(seed, 0.3)], 1e-3, 0.5, "gaussian", decay=True)
    assert torch.equal(b, torch.from_numpy(reference_update(theta0.numpy(), [z], [0.3], 1e-3, 0.5, True)))
    assert not torch.equal(a, b)


def test_apply_update_averages_directions():
    # q copies of one direction with the same g average to that single direction.
    theta = _theta((50,), torch.float32, seed=3)
    one, three = theta.clone(), theta.clone()
    zo.apply_update(one, "w", [(8, 1.0)], 0.5, 0.0, "rademacher", decay=False)
    zo.apply_update(three, "w", [(8, 1.0)] * 3, 0.5, 0.0, "rademacher", decay=False)
    assert torch.equal(one, three)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_update_chunk_independent(rounding: str):
    theta0 = _theta((203,), torch.bfloat16, seed=4)
    dirs = [(11, 0.5), (12, -1.5)]
    results = []
    for chunk in (1 << 22, 1, 5, 64):
        t = theta0.clone()
        zo.apply_update(
            t, "w", dirs, 1e-2, 0.1, "gaussian", decay=True, rounding=rounding, sr_seed=99, chunk=chunk
        )
        results.append(_bits(t))
    assert all(torch.equal(r, results[0]) for r in results)


def test_apply_update_float64_master():
    theta = _theta((20,), torch.float64, seed=5)
    before = theta.clone()
    z = rng.normal(3, "w", 0, 20, "cpu")
    zo.apply_update(theta, "w", [(3, 0.25)], 1e-2, 0.0, "gaussian", decay=True)
    expected = before - (z * np.float32(0.25)).double() * float(np.float32(1e-2))
    assert torch.equal(theta, expected)


def test_apply_update_validation():
    theta = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sr_seed"):
        zo.apply_update(theta, "w", [(1, 1.0)], 1e-3, 0.0, "gaussian", decay=False, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        zo.apply_update(theta, "w", [(1, 1.0)], 1e-3, 0.0, "gaussian", decay=False, rounding="floor")
    with pytest.raises(ValueError, match="directions"):
        zo.apply_update(theta, "w", [], 1e-3, 0.0, "gaussian", decay=False)
    with pytest.raises(ValueError, match="contiguous"):
        zo.apply_update(torch.zeros(4, 4).t(), "w", [(1, 1.0)], 1e-3, 0.0, "gaussian", decay=False)


# ---------------------------------------------------------------- stochastic rounding


def _neighbours(x: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) representable neighbours of float32 x in dtype, found without torch."""
    if dtype == torch.bfloat16:
        # bf16 = the top 16 bits of a float32: truncation goes toward zero, +1 unit away from it.
        bits = x.view(np.uint32)
        toward = (bits & np.uint32(0xFFFF0000)).view(np.float32)
        away = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
        return np.minimum(toward, away), np.maximum(toward, away)
    near = x.astype(np.float16)
    other = np.nextafter(near, np.where(near.astype(np.float32) < x, np.inf, -np.inf).astype(np.float16))
    return np.minimum(near, other).astype(np.float32), np.maximum(near, other).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_returns_a_neighbour(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20_000, generator=gen) * 3
    u = rng.uniform(1, "sr", 0, x.numel(), "cpu")
    out = zo.stochastic_round(x, dtype, u)
    assert out.dtype == dtype
    lo, hi = _neighbours(x.numpy(), dtype)
    got = out.float().numpy()
    inexact = lo != hi
    assert inexact.all()  # random normals are not representable in 8 or 11 bits
    assert np.all((got == lo) | (got == hi))
    # The upper neighbour is taken exactly when u < (x - lo) / (hi - lo).
    p = (x.numpy().astype(np.float64) - lo) / (hi.astype(np.float64) - lo)
    clear = np.abs(u.numpy() - p) > 1e-6
    assert np.array_equal((got == hi)[clear], (u.numpy() < p)[clear])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_keeps_exact_values(dtype: torch.dtype):
    exact = (torch.randn(5000, generator=torch.Generator().manual_seed(7)) * 10).to(dtype)
    specials = torch.tensor([0.0, -0.0, 1.0, -2.0, float("inf"), -float("inf")], dtype=dtype)
    values = torch.cat([exact, specials])
    for u_value in (0.0, 0.5, 1 - 2**-24):
        u = torch.full((values.numel(),), u_value)
        assert torch.equal(_bits(zo.stochastic_round(values.float(), dtype, u)), _bits(values))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_over_u(dtype: torch.dtype):
    # Sweep u over a grid of K points: the mean result equals x within one grid step of an ulp.
    k = 4096
    u = torch.arange(k, dtype=torch.float32) / k
    for value in (1.0 + 1e-3, -3.14159, 0.1, 1234.5678, 1e-6):
        x = torch.full((k,), value, dtype=torch.float32)
        lo, hi = _neighbours(x[:1].numpy(), dtype)
        ulp = float(hi[0]) - float(lo[0])
        mean = zo.stochastic_round(x, dtype, u).double().mean().item()
        assert abs(mean - x[0].item()) <= ulp / k


def test_stochastic_round_validation():
    with pytest.raises(ValueError, match="float32"):
        zo.stochastic_round(torch.zeros(3, dtype=torch.float64), torch.bfloat16, torch.zeros(3))
    with pytest.raises(ValueError, match="bfloat16, float16"):
        zo.stochastic_round(torch.zeros(3), torch.int8, torch.zeros(3))
    assert torch.equal(
        zo.stochastic_round(torch.tensor([0.1]), torch.float32, torch.zeros(1)), torch.tensor([0.1])
    )


N_TINY = 1_000_000


@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_tiny_update_moves_mean_with_stochastic_rounding(dtype: torch.dtype, ulp: float):
    """Invariant 5: an update of 1e-3 ulp still moves the weights in expectation."""
    x = torch.full((N_TINY,), 1.5 + 1e-3 * ulp, dtype=torch.float32)  # 1.5: ulp is the same both sides
    shift = x[0].item() - 1.5  # the float32 value of the 1e-3-ulp step
    u = rng.uniform(21, "w", 0, N_TINY, "cpu")
    mean = zo.stochastic_round(x, dtype, u).double().mean().item()
    # Each element moves up one ulp with p = shift / ulp: sd of the mean = ulp sqrt(p (1 - p) / n).
    p = shift / ulp
    sigma = ulp * math.sqrt(p * (1 - p) / N_TINY)
    assert abs((mean - 1.5) - shift) < 5 * sigma  # 5 sigma, while shift is ~30 sigma
    assert torch.all(x.to(dtype).float() == 1.5)  # round to nearest loses the update entirely


@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_apply_update_tiny_steps_survive_in_low_precision_master(dtype: torch.dtype, ulp: float):
    lr = 1e-3 * ulp
    theta0 = torch.full((N_TINY,), 1.5, dtype=dtype)
    seed = rng.step_seed(3, 17)
    nearest = theta0.clone()
    zo.apply_update(nearest, "w", [(seed, 1.0)], lr, 0.0, "rademacher", decay=False)
    assert torch.equal(nearest, theta0)  # every update rounded away
    sr = theta0.clone()
    zo.apply_update(
        sr, "w", [(seed, 1.0)], lr, 0.0, "rademacher", decay=False, rounding="stochastic", sr_seed=seed
    )
    # θ_i - lr z_i with z = ±1: E[(new_i - 1.5) z_i] = -lr; each term is ±ulp with p = lr / ulp.
    z = rng.rademacher(seed, "w", 0, N_TINY, "cpu").double()
    step = float(np.float32(lr))
    moved = ((sr.double() - 1.5) * z).mean().item()
    p = step / ulp
    assert abs(moved + step) < 5 * ulp * math.sqrt(p * (1 - p) / N_TINY)


def test_stochastic_mode_on_fp32_master_is_nearest():
    a, b = _theta((100,), torch.float32), _theta((100,), torch.float32)
    zo.apply_update(a, "w", [(1, 2.0)], 1e-3, 0.0, "gaussian", decay=False)
    zo.apply_update(b, "w", [(1, 2.0)], 1e-3, 0.0, "gaussian", decay=False, rounding="stochastic", sr_seed=5)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- names, schedules, guard


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", True),
        ("model.embed_tokens.weight", True),
        ("lm_head.weight", True),
        ("model.layers.0.self_attn.q_proj.bias", False),
        ("model.layers.0.input_layernorm.weight", False),
        ("model.layers.3.self_attn.q_norm.weight", False),
        ("model.norm.weight", False),
        ("transformer.h.0.ln_1.weight", False),
        ("model.decoder.layers.0.final_layer_norm.weight", False),
        ("bert.encoder.layer.0.output.LayerNorm.weight", False),
    ],
)
def test_is_decayed(name: str, expected: bool):
    assert zo.is_decayed(name) is expected


def _is_f32(x: float) -> bool:
    return float(np.float32(x)) == x


def test_lr_schedule_values():
    const = schedule.LRSchedule("constant", 0.01, total_steps=100, warmup_steps=4)
    assert [const.lr_at(s) for s in (0, 1, 2, 4, 99, 500)] == [
        0.0,
        float(np.float32(0.0025)),
        float(np.float32(0.005)),
        float(np.float32(0.01)),
        float(np.float32(0.01)),
        float(np.float32(0.01)),
    ]
    lin = schedule.LRSchedule("linear", 1e-3, total_steps=10, warmup_steps=2)
    # After warmup: base * (10 - step) / 8.
    for step, hand in [(1, 5e-4), (2, 1e-3), (6, 5e-4), (9, 1.25e-4), (10, 0.0), (12, 0.0)]:
        assert lin.lr_at(step) == pytest.approx(hand, rel=1e-7, abs=0) and _is_f32(lin.lr_at(step))
    cos = schedule.LRSchedule("cosine", 2e-3, total_steps=10, min_lr_ratio=0.1)
    # min + (base - min) (1 + cos(pi step / 10)) / 2 with min = 2e-4.
    for step, hand in [
        (0, 2e-3),
        (5, 1.1e-3),
        (10, 2e-4),
        (20, 2e-4),
        (2, 2e-4 + 1.8e-3 * (1 + math.cos(0.2 * math.pi)) / 2),
    ]:
        assert cos.lr_at(step) == pytest.approx(hand, rel=1e-7, abs=0) and _is_f32(cos.lr_at(step))
    with pytest.raises(ValueError, match="step"):
        cos.lr_at(-1)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"kind": "step"}, "kind"),
        ({"base_lr": 0.0}, "base_lr"),
        ({"base_lr": float("nan")}, "base_lr"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 11}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ],
)
def test_lr_schedule_validation(kwargs: dict, field: str):
    args = {"kind": "linear", "base_lr": 1e-3, "total_steps": 10} | kwargs
    with pytest.raises(ValueError, match=field):
        schedule.LRSchedule(**args)


def test_lr_schedule_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.LRSchedule("constant", 1e-3, 10).base_lr = 1.0  # type: ignore[misc]


def test_divergence_check():
    history = [1.0, -0.8, 1.2, -1.1, 0.9, 1.0, -1.3, 0.7, 1.05]  # median |g| = 1.0
    assert climb.divergence_check(15.0, 2.0, 1.9, history) is None
    assert "median" in climb.divergence_check(-25.0, 2.0, 1.9, history)
    assert climb.divergence_check(25.0, 2.0, 1.9, history, max_ratio=30.0) is None
    assert climb.divergence_check(1e6, 2.0, 1.9, history[:7]) is None  # too little history to judge
    assert "loss" in climb.divergence_check(1.0, float("nan"), 1.9, history)
    assert "loss" in climb.divergence_check(1.0, 2.0, float("inf"), [])
    assert "g" in climb.divergence_check(float("inf"), 2.0, 1.9, [])
    assert climb.divergence_check(5.0, 2.0, 1.9, [0.0] * 10) is None  # zero median: no scale to judge by


# ---------------------------------------------------------------- CPU == CUDA


@cuda
def test_cuda_matches_cpu_bitwise():
    theta = _theta((4099,), torch.bfloat16, seed=8)
    for kind in KINDS:
        cpu = zo.perturbed(theta, kind, 3, "w", 1e-3, 1, torch.bfloat16, chunk=1000)
        gpu = zo.perturbed(theta.cuda(), kind, 3, "w", 1e-3, 1, torch.bfloat16)
        assert torch.equal(_bits(cpu), _bits(gpu.cpu()))
        a, b = theta.clone(), theta.cuda()
        dirs = [(3, 0.5), (4, -0.25), (5, 2.0)]
        for t in (a, b):
            zo.apply_update(t, "w", dirs, 1e-3, 0.1, kind, decay=True, rounding="stochastic", sr_seed=6)
        assert torch.equal(_bits(a), _bits(b.cpu()))


# ---------------------------------------------------------------- update mask


def _np_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even on the bits) -> float32, in numpy (finite x)."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_update_matches_reference_loop(one_sided: bool, dtype: torch.dtype):
    """A direction's term counts only where the perturbed copies differ once rounded to bf16: the
    textbook loop spells the copies out in numpy (θ ± ε z, one float32 rounding each, then bf16)."""
    theta = (_theta((40, 50), torch.float32, seed=5) * 2).to(dtype)
    x = theta.float().numpy().reshape(-1).copy()
    dirs = [(rng.step_seed(9, 4, d), g) for d, g in enumerate([0.75, -2.5])]
    eps, lr, wd, f = 2e-3, 1e-2, 0.1, np.float32
    zo.apply_update(
        theta, "w", dirs, lr, wd, "gaussian", decay=True, mask=zo.UpdateMask(eps, torch.bfloat16, one_sided)
    )
    zs = [rng.noise("gaussian", s, "w", x.size).numpy() for s, _ in dirs]
    kept = []
    for z in zs:
        dz = (z * f(eps)).astype(np.float32)
        plus = _np_bf16((x + dz).astype(np.float32))
        other = _np_bf16(x) if one_sided else _np_bf16((x - dz).astype(np.float32))
        kept.append(np.where(plus != other, z, f(0)).astype(np.float32))
    ref = reference_update(x, kept, [g for _, g in dirs], lr, wd, True)
    assert torch.equal(_bits(theta.view(-1)), _bits(torch.from_numpy(ref).to(dtype)))
    share = 1 - np.mean([np.mean(k != 0) for k in kept])
    assert 0.1 < share < 0.9, share  # both kinds of coordinate occur


def test_logs_without_a_mask_replay_unmasked():
    """apply_step follows the log header: a log from before masks (no update_mask entry) applies every
    coordinate's term, as it was trained; one with the entry masks."""
    from zostream.engine.trainer import apply_step
    from zostream.engine.update_log_format import LogHeader, Step

    old = LogHeader(
        "fp", {"kind": "full"}, "gaussian", rng.GENERATOR_VERSION, "bfloat16", "stochastic", 2e-3, 0.0, [], 3
    )
    new = dataclasses.replace(
        old, extra={"update_mask": zo.UpdateMask(2e-3, torch.bfloat16, False).header_entry()}
    )
    step = Step(0, 1e-2, (1.5,))
    theta = (_theta((1000,), torch.float32, seed=6) * 2).to(torch.bfloat16)
    got_old, got_new, plain, masked = (theta.clone() for _ in range(4))
    apply_step({"w": got_old}, step, old)
    apply_step({"w": got_new}, step, new)
    dirs, kw = (
        [(rng.step_seed(3, 0, 0), 1.5)],
        dict(decay=False, rounding="stochastic", sr_seed=rng.step_seed(3, 0, 0xFFFF)),
    )
    zo.apply_update(plain, "w", dirs, 1e-2, 0.0, "gaussian", **kw)
    zo.apply_update(
        masked, "w", dirs, 1e-2, 0.0, "gaussian", mask=zo.UpdateMask(2e-3, torch.bfloat16, False), **kw
    )
    assert torch.equal(_bits(got_old), _bits(plain)) and torch.equal(_bits(got_new), _bits(masked))
    assert not torch.equal(_bits(plain), _bits(masked))
    with pytest.raises(ValueError, match="update_mask"):
        zo.UpdateMask.from_header({"dtype": "int8", "copies": "pair"}, 1e-3)
