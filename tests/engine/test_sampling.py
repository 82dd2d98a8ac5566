"""Sampling vs transformers' logits processors, seeded reproducibility, batch independence, statistics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from zostream.engine.errors import RequestError
from zostream.engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature_top_k_top_p,
    logprobs,
    make_generator,
    sample,
)

V = 64
CHI2_4DOF_P001 = 18.467  # chi-square critical value, 4 degrees of freedom, p = 0.001
CHI2_2DOF_P001 = 13.816


def hf_warp(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The HF warper chain on one row [1, V], with each warper only when it is switched on."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    if temperature > 0:
        row = TemperatureLogitsWarper(temperature)(ids, row)
    if top_k > 0:
        row = TopKLogitsWarper(top_k)(ids, row)
    if top_p < 1.0:
        row = TopPLogitsWarper(top_p)(ids, row)
    return row


WARP_PARAMS = [  # (temperature, top_k, top_p), one row each
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),
    (1.3, 0, 0.9),
    (0.5, 10, 0.8),
    (2.0, 3, 0.5),
    (1.0, V + 10, 0.95),
    (0.9, 1, 0.3),
    (1.0, 0, 1e-6),
    (1.0, 0, 1e-9),  # 1 - top_p rounds to 1.0 in float32: only min_tokens_to_keep saves the max
    (0.25, 40, 0.99),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temperature_top_k_top_p_matches_hf_per_row(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(WARP_PARAMS), V, generator=gen) * 3.0
    t = torch.tensor([p[0] for p in WARP_PARAMS], dtype=torch.float32)
    k = torch.tensor([p[1] for p in WARP_PARAMS], dtype=torch.long)
    p = torch.tensor([p[2] for p in WARP_PARAMS], dtype=torch.float64)
    out = apply_temperature_top_k_top_p(logits, t, k, p)
    assert out.shape == logits.shape and out.dtype == torch.float32
    for b, (tb, kb, pb) in enumerate(WARP_PARAMS):
        ref = hf_warp(logits[b : b + 1].clone(), tb, kb, pb)[0]
        assert torch.equal(torch.isinf(out[b]), torch.isinf(ref)), f"row {b}: -inf masks differ"
        finite = torch.isfinite(ref)
        torch.testing.assert_close(out[b][finite], ref[finite])
        assert finite.sum() >= 1
    # Filters switched off and temperature 1 leave the row unchanged.
    assert torch.equal(out[0], logits[0])
    assert not torch.equal(out, logits)  # the other rows were actually filtered


def test_repetition_penalty_matches_hf_per_row() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, V, generator=gen) * 2.0
    penalties = [1.0, 1.2, 0.8, 2.0, 1.5]
    seen = [
        torch.tensor([3, 4, 5], dtype=torch.long),
        torch.tensor([1, 1, 2, 63, 2, 1], dtype=torch.long),  # duplicates count once
        torch.tensor([0, 10, 20, 30, 40, 50], dtype=torch.long),
        torch.randint(0, V, (40,), generator=gen),
        torch.tensor([5, V + 3, 6], dtype=torch.long),  # ids beyond the head's vocab are ignored
    ]
    out = apply_repetition_penalty(logits, seen, torch.tensor(penalties))
    assert out.shape == logits.shape and out.data_ptr() != logits.data_ptr()
    for b in range(5):
        ref = RepetitionPenaltyLogitsProcessor(penalties[b])(seen[b][None, :], logits[b : b + 1].clone())[0]
        torch.testing.assert_close(out[b], ref)
    assert torch.equal(out[0], logits[0])  # penalty 1 is a no-op
    assert not torch.equal(out[1], logits[1])


def test_repetition_penalty_empty_seen_and_no_mutation() -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    seen = [torch.empty(0, dtype=torch.long), torch.tensor([7], dtype=torch.long)]
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 2.0]))
    assert torch.equal(logits, before)
    assert torch.equal(out[0], logits[0])
    expected = logits[1, 7] / 2.0 if logits[1, 7] > 0 else logits[1, 7] * 2.0
    assert out[1, 7] == expected
    assert torch.equal(torch.cat([out[1, :7], out[1, 8:]]), torch.cat([logits[1, :7], logits[1, 8:]]))


def test_greedy_is_argmax_after_penalty_and_leaves_generator_alone() -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, V, generator=gen)
    seen = [torch.randint(0, V, (12,), generator=gen) for _ in range(4)]
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(top_k=3, top_p=0.5),  # ignored when greedy
        SamplingParams(repetition_penalty=0.6),
    ]
    g = make_generator(5, "cpu")
    state = g.get_state().clone()
    out = sample(logits, params, [None, g, None, None], seen)
    assert out.dtype == torch.int64 and out.shape == (4,)
    assert torch.equal(g.get_state(), state)
    for b, sp in enumerate(params):
        row = logits[b : b + 1].clone()
        if sp.repetition_penalty != 1.0:
            row = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(seen[b][None, :], row)
        assert out[b].item() == int(row.argmax())
    # Any float dtype in; computed in float32.
    half = logits.to(torch.bfloat16)
    assert torch.equal(sample(half, [SamplingParams()] * 4, [None] * 4, seen), half.float().argmax(-1))


def _target_logits(step: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(1000 + step)) * 2.0


def _run(target: SamplingParams, others: list[SamplingParams] | None, steps: int = 20) -> list[int]:
    """Decode `steps` tokens for `target`, alone or at row 2 of a batch with `others`."""
    batch = [target] if others is None else others[:2] + [target] + others[2:]
    pos = 0 if others is None else 2
    gens = [make_generator(sp.seed, "cpu") if not sp.greedy else None for sp in batch]
    seen = [torch.tensor([1, 2, 3], dtype=torch.long) for _ in batch]
    noise = torch.Generator().manual_seed(99)
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(batch), V, generator=noise) * 3.0  # batch-mates' logits vary
        logits[pos] = _target_logits(step)
        out = sample(logits, batch, gens, seen)
        seen = [torch.cat([s, out[b : b + 1]]) for b, s in enumerate(seen)]
        tokens.append(int(out[pos]))
    return tokens


def test_sampled_row_is_reproducible_and_independent_of_batch() -> None:
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.1, seed=1234)
    others = [
        SamplingParams(temperature=1.5, seed=1),
        SamplingParams(),  # greedy, no generator
        SamplingParams(temperature=0.3, top_k=2, top_p=0.5, repetition_penalty=1.3, seed=1234),  # same seed
    ]
    alone = _run(target, None)
    assert alone == _run(target, None)
    assert alone == _run(target, others)
    assert alone == _run(target, others[::-1])
    assert len(set(alone)) > 5  # it really sampled
    assert _run(dataclasses.replace(target, seed=1235), None) != alone


def _counts(logits: torch.Tensor, sp: SamplingParams, n: int) -> torch.Tensor:
    """n draws from one fixed distribution: n rows sharing one generator, so draws are sequential."""
    g = make_generator(sp.seed, "cpu")
    out = sample(logits.expand(n, -1), [sp] * n, [g] * n, [torch.empty(0, dtype=torch.long)] * n)
    return torch.bincount(out, minlength=logits.shape[-1]).double()


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    ref = torch.softmax(logits.double(), -1)  # textbook reference, float64
    counts = _counts(logits, SamplingParams(temperature=1.0, seed=2024), 20_000)
    assert _chi2(counts, ref) < CHI2_4DOF_P001
    # temperature 0.5 + top_k 3: softmax(l / 0.5) renormalised over the top 3, nothing elsewhere.
    counts = _counts(logits, SamplingParams(temperature=0.5, top_k=3, seed=7), 20_000)
    assert counts[3:].sum() == 0
    ref3 = torch.softmax(logits[:3].double() / 0.5, -1)
    assert _chi2(counts[:3], ref3) < CHI2_2DOF_P001
    # The check can tell temperatures apart.
    assert _chi2(counts[:3], torch.softmax(logits[:3].double(), -1)) > 100


def test_top_k_1_and_tiny_top_p_keep_only_the_max() -> None:
    # Flat-ish logits: real sampling would not pick the argmax every time.
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(4)) * 0.5
    seen = [torch.empty(0, dtype=torch.long)] * 8
    argmax = logits.argmax(-1)
    for sp in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0, top_p=1e-9)):
        params = [dataclasses.replace(sp, seed=s) for s in range(8)]
        gens = [make_generator(s, "cpu") for s in range(8)]
        for _ in range(5):
            assert torch.equal(sample(logits, params, gens, seen), argmax)
    masked = apply_temperature_top_k_top_p(
        logits, torch.ones(8), torch.zeros(8, dtype=torch.long), torch.full((8,), 1e-9, dtype=torch.float64)
    )
    assert torch.equal(torch.isfinite(masked).sum(-1), torch.ones(8, dtype=torch.long))
    assert torch.equal(masked.argmax(-1), argmax)


def test_sample_checks_its_inputs() -> None:
    logits = torch.zeros(2, V)
    seen = [torch.empty(0, dtype=torch.long)] * 2
    with pytest.raises(ValueError, match="one params"):
        sample(logits, [SamplingParams()], [None, None], seen)
    with pytest.raises(ValueError, match="row 1 samples"):
        sample(logits, [SamplingParams(), SamplingParams(temperature=1.0)], [None, None], seen)
    assert sample(torch.zeros(0, V), [], [], []).shape == (0,)


def test_logprobs_match_float64_log_softmax() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(8)) * 4.0
    tokens = torch.tensor([0, 17, 63])
    l64 = logits.double()
    ref = l64[torch.arange(3), tokens] - torch.log(torch.exp(l64).sum(-1))
    out = logprobs(logits.to(torch.bfloat16), tokens)
    assert out.dtype == torch.float32
    ref_bf16 = logits.to(torch.bfloat16).double()
    ref_bf16 = ref_bf16[torch.arange(3), tokens] - torch.log(torch.exp(ref_bf16).sum(-1))
    torch.testing.assert_close(out.double(), ref_bf16, rtol=0, atol=1e-5)
    torch.testing.assert_close(logprobs(logits, tokens).double(), ref, rtol=0, atol=1e-5)


def test_make_generator_is_seeded() -> None:
    a = torch.rand(8, generator=make_generator(2**63 - 1, "cpu"))
    b = torch.rand(8, generator=make_generator(2**63 - 1, torch.device("cpu")))
    c = torch.rand(8, generator=make_generator(0, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(c, torch.rand(8, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="seed"):
        make_generator(-1, "cpu")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"repetition_penalty": 101.0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_params_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(RequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field)
    assert isinstance(err.value, ValueError)


def test_params_accept_the_range_ends() -> None:
    assert SamplingParams().greedy
    sp = SamplingParams(temperature=100, top_k=0, top_p=1, repetition_penalty=100, seed=2**63 - 1)
    assert not sp.greedy and isinstance(sp.temperature, float) and isinstance(sp.top_p, float)
    assert SamplingParams(temperature=1e-3, top_p=1e-9, repetition_penalty=1e-3, seed=0).seed == 0
