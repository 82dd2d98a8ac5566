"""Choice losses and ZO estimators.

- the candidates loss of a training step against a cross-entropy written here on transformers' logits
  (PEFT model with the same perturbed LoRA factors): independent reference;
- evaluation's candidate scores against transformers' (one row per candidate, the slow obvious way);
- the fzoo estimator against a textbook loop written here (unperturbed + q one-sided forwards, σ of
  the losses, θ -= lr mean_d c_d z_d): logs and adapters bitwise, under every streaming budget;
- replay of an fzoo log reproduces the trained adapter bitwise;
- resolution of loss/estimator, errors naming the field, old logs resuming as mezo on tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.engine.test_trainer import (
    TextbookMeZO,
    assert_same_tensors,
    check_runs_match_textbook,
    exported,
    open_job,
)
from zostream.engine import data as D
from zostream.engine import estimators as E
from zostream.engine import losses as LS
from zostream.engine import rng, zo
from zostream.engine.batching import batch_order
from zostream.engine.config import ZOConfig
from zostream.engine.errors import RequestError
from zostream.engine.finetune import export

VOCAB = 101


pytestmark = pytest.mark.usefixtures("one_thread")


def spy_losses(tr) -> list[list[tuple[float, float]]]:
    """Record what each of the trainer's step workloads reports: per step, its (L+, L-) per direction."""
    seen: list[list[tuple[float, float]]] = []
    orig = tr.workload

    def spy():
        wl = orig()
        inner = wl.losses
        wl.losses = lambda: seen.append(inner()) or seen[-1]
        return wl

    tr.workload = spy
    return seen


def choice_dataset(n: int = 12, seed: int = 0, multi: bool = True) -> D.Dataset:
    """Random prompts; every other record has single-token candidates, the rest 3 multi-token ones."""
    g = torch.Generator().manual_seed(seed)
    chs = []
    for i in range(n):
        p = tuple(torch.randint(1, VOCAB, (4 + i % 3,), generator=g).tolist())
        if i % 2 or not multi:
            cands: tuple[tuple[int, ...], ...] = ((11,), (12,))
        else:
            cands = ((11, 13), (12,), (14, 15, 16))
        chs.append(D.ChoiceExample(p, cands, i % len(cands)))
    return D.Dataset("choice", [D.choice_batches(c)[c.answer] for c in chs], chs, "mem")


CHOICES = choice_dataset()


def hf_candidate_loglik(model, params, ch: D.ChoiceExample) -> list[float]:
    """Summed log-likelihood of each candidate: one transformers forward per prompt + candidate."""
    out = []
    for c in ch.candidates:
        ids = torch.tensor([ch.prompt_ids + c])
        logits = torch.func.functional_call(model, params, (ids,)).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        p = len(ch.prompt_ids)
        out.append(sum(float(logp[p - 1 + j, t]) for j, t in enumerate(c)))
    return out


def hf_ce(model, params, chs: list[D.ChoiceExample], score: str) -> float:
    """Mean over records of -log softmax(scores)[answer], scores = mean or summed log-likelihood."""
    total = 0.0
    for ch in chs:
        ll = hf_candidate_loglik(model, params, ch)
        s = [x / len(c) for x, c in zip(ll, ch.candidates, strict=True)] if score == "mean" else ll
        m = max(s)
        total += m + math.log(sum(math.exp(x - m) for x in s)) - s[ch.answer]
    return total / len(chs)


def peft_model(model_dir: Path, cfg: ZOConfig):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # "all-linear" goes to PEFT as its own shorthand: PEFT picks the modules (an independent resolution)
    targets = "all-linear" if cfg.lora_targets == ("all-linear",) else list(cfg.lora_targets)
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(hf, lc).eval()


@pytest.mark.parametrize("score", ["mean", "sum"])
def test_candidates_loss_matches_transformers(models, tmp_path, score):
    """The step's fzoo losses (θ, θ + εz_d) equal a cross-entropy over candidates on transformers' logits."""
    model = models("llama")
    cfg = ZOConfig(
        method="lora", steps=2, batch_size=4, seed=5, eps=0.05, q=2, choice_score=score, estimator="fzoo"
    )
    tr = open_job(model, tmp_path / "job", cfg, CHOICES)
    assert tr.loss == "candidates" and tr.cfg.estimator == "fzoo"
    hf = peft_model(model, cfg)
    names = {n: n.replace(".weight", ".default.weight") for n in tr.adapter.tensors}
    seen = spy_losses(tr)  # each step's (L+, L-) per direction, as the trainer read them
    with torch.inference_mode():
        for t in range(2):
            tr.flush()  # the previous step's update is applied lazily, inside the next pass
            master = {n: tr.adapter.tensors[n].clone() for n in names}
            tr.run_step()
            idx = batch_order(len(CHOICES.choices), cfg.batch_size, cfg.seed, t)
            chs = [CHOICES.choices[i] for i in idx]
            want = [hf_ce(hf, {names[n]: v for n, v in master.items()}, chs, score)]
            for d in range(cfg.q):
                seed = rng.step_seed(cfg.seed, t, d)
                pert = {
                    names[n]: zo.perturbed(v, cfg.noise, seed, n, cfg.epsilon, 1, torch.float32)
                    for n, v in master.items()
                }
                want.append(hf_ce(hf, pert, chs, score))
            got = [seen[t][0][1]] + [lp for lp, _ in seen[t]]  # fzoo pairs: (L_d, L_0)
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert len({round(x, 9) for x in want}) > 1  # the perturbations moved the loss: not vacuous


def test_evaluate_candidate_scores_match_transformers(models, tmp_path):
    """Held-out accuracy / answer NLL / candidate CE from the fewest rows == one HF forward per candidate."""
    model = models("llama")
    cfg = ZOConfig(method="lora", steps=1, batch_size=4)
    tr = open_job(model, tmp_path / "job", cfg, CHOICES)
    torch.manual_seed(0)
    served = tr.served_adapter()  # what evaluate() scores (the average of the factors, at step 0 θ_0)
    for t in served.tensors.values():  # a non-zero adapter, so the LoRA path counts
        t.add_(torch.randn_like(t) * 0.05)
    got = tr.evaluate(CHOICES, batch_size=5)
    hf = peft_model(model, cfg)
    params = {n.replace(".weight", ".default.weight"): v for n, v in served.tensors.items()}
    hits, nll, count, ce = 0, 0.0, 0, 0.0
    with torch.inference_mode():
        for ch in CHOICES.choices:
            ll = hf_candidate_loglik(hf, params, ch)
            s = [x / len(c) for x, c in zip(ll, ch.candidates, strict=True)]
            hits += max(range(len(s)), key=s.__getitem__) == ch.answer
            nll -= ll[ch.answer]
            count += len(ch.candidates[ch.answer])
            ce += float(torch.logsumexp(torch.tensor(s, dtype=torch.float64), 0)) - s[ch.answer]
    n = len(CHOICES.choices)
    assert got["accuracy"] == hits / n
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["candidate_loss"] == pytest.approx(ce / n, rel=1e-5)


def test_candidate_rows_single_token_shortcut():
    """Bookkeeping: one row per single-token record, a row per candidate otherwise; slots cover tokens."""
    rows, index = LS.candidate_rows(CHOICES.choices[:2])  # record 0: 3 multi-token, record 1: 2 single
    assert len(rows) == 3 + 1
    assert index.per_record == (3, 2) and index.lengths.tolist() == [2, 1, 3, 1, 1]
    assert rows[3].input_ids == CHOICES.choices[1].prompt_ids
    assert index.tok.tolist() == [11, 13, 12, 14, 15, 16, 11, 12]


# ---------------------------------------------------------------------------------------------- fzoo


class TextbookFZOO(TextbookMeZO):
    """FZOO as the paper writes it, every weight resident: L0 = L(θ), L_d = L(θ + ε z_d), σ = std(L_d),
    θ ← θ - η/(qσ) Σ_d (L_d - L0) z_d, applied right after the step's forwards (token loss)."""

    @torch.inference_mode()
    def step(self, t: int) -> None:
        cfg = self.cfg
        batch = self.batch(t)

        def loss(w):
            return self.loss(w, None, batch) if cfg.method == "full" else self.loss(self.base, w, batch)

        losses = [loss(self.master)]
        differ = []  # per direction: the coordinates whose θ + εz differs from θ (only they move)
        for d in range(cfg.q):
            seed = rng.step_seed(cfg.seed, t, d)
            plus = {
                n: zo.perturbed(v, cfg.noise, seed, n, cfg.epsilon, 1, v.dtype)
                for n, v in self.master.items()
            }
            losses.append(loss(plus))
            differ.append({n: plus[n] != v for n, v in self.master.items()})
        ls = losses[1:]
        mean = sum(ls) / len(ls)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in ls) / len(ls))
        cs = [zo.f32((x - losses[0]) / sigma) for x in ls]
        self.history.append((losses, cs, self.update(t, cs, differ)))

    def step_loss(self, losses: list[float]) -> float:
        return losses[0]  # the loss a step logs: L(θ), the unperturbed forward


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fzoo_matches_textbook_bitwise(models, tmp_path, method):
    model = models("llama")
    cfg = ZOConfig(
        method=method,
        steps=3,
        batch_size=4,
        seed=7,
        q=3,
        lr=2e-2 if method == "lora" else 2e-3,
        eps=1e-3,
        weight_decay=0.05,
        loss="tokens",
    )
    assert cfg.estimator == "fzoo"
    check_runs_match_textbook(model, tmp_path, cfg, TextbookFZOO(model, cfg).run(cfg.steps))


def test_fzoo_candidates_replay_is_bitwise(models, tmp_path):
    from zostream.engine.replay import replay_lora
    from zostream.engine.store import WeightStore
    from zostream.engine.update_log import UpdateLog

    model = models("llama")
    cfg = ZOConfig(method="lora", steps=4, batch_size=4, seed=3, estimator="fzoo")
    tr = open_job(model, tmp_path / "job", cfg, CHOICES)
    for _ in range(cfg.steps):
        tr.run_step()
    export(tr, tmp_path / "job")
    tr.log.close()
    log = UpdateLog.open(tmp_path / "job" / "update.log", repair=False)
    assert log.header.extra["estimator"] == "fzoo" and log.header.extra["loss"] == "candidates"
    got = replay_lora(WeightStore(model), log)
    log.close()
    want = exported(tmp_path / "job", "lora")
    assert_same_tensors({n: t for n, t in got.tensors.items()}, want)


def test_coefficients_by_hand():
    assert E.coefficients("mezo", [(3.0, 1.0)], 0.5) == [2.0]
    # L0 = 1, L = (2, 0): σ = 1, c = (1, -1)
    assert E.pairs("fzoo", [1.0, 2.0, 0.0]) == [(2.0, 1.0), (0.0, 1.0)]
    assert E.coefficients("fzoo", [(2.0, 1.0), (0.0, 1.0)], 1e-3) == [1.0, -1.0]
    assert E.coefficients("fzoo", [(1.0, 1.0), (1.0, 1.0)], 1e-3) == [0.0, 0.0]
    assert all(math.isnan(c) for c in E.coefficients("fzoo", [(math.inf, 1.0), (0.0, 1.0)], 1e-3))
    assert E.forwards("fzoo", 2) == [(0, 0), (0, 1), (1, 1)]


def test_config_resolution_and_errors(models, tmp_path):
    # auto: grzo (4 groups of the batch) for LoRA and full, fzoo when no q groups fit
    assert (ZOConfig().estimator, ZOConfig().q, ZOConfig().schedule) == ("grzo", 4, "cosine")
    assert (ZOConfig(batch_size=6).q, ZOConfig(batch_size=2).q) == (3, 2)
    assert (ZOConfig(method="full").estimator, ZOConfig(method="full").q) == ("grzo", 4)
    assert ZOConfig(method="full", batch_size=1).estimator == "fzoo"
    assert (ZOConfig(batch_size=1).estimator, ZOConfig(batch_size=6, q=4).estimator) == ("fzoo", "fzoo")
    assert ZOConfig(batch_size=16, q=4).estimator == "grzo"
    assert ZOConfig(method="full").schedule == "cosine"
    assert ZOConfig(method="full", estimator="fzoo").schedule == ZOConfig(lr_schedule="constant").schedule
    assert (ZOConfig(q=1).estimator, ZOConfig(q=1).learning_rate) == ("mezo", 1e-4)
    with pytest.raises(ValueError, match="q: fzoo"):
        ZOConfig(estimator="fzoo", q=1)
    with pytest.raises(ValueError, match="^loss: "):
        ZOConfig(loss="ce")
    text = D.Dataset("text", [D.Example((1, 2, 3), (D.IGNORE, 2, 3))] * 4, [], "mem")
    with pytest.raises(RequestError, match="candidates' needs choice records") as err:
        open_job(models("llama"), tmp_path / "job", ZOConfig(steps=1, batch_size=2, loss="candidates"), text)
    assert err.value.field == "loss"
    assert not (tmp_path / "job").exists()


def test_old_log_resumes_as_mezo_on_tokens(models, tmp_path):
    """A log without estimator/loss entries (every log before them) resumes as what it was."""
    model = models("llama")
    old = ZOConfig(method="lora", steps=2, batch_size=4, estimator="mezo", loss="tokens")
    tr = open_job(model, tmp_path / "job", old, CHOICES)
    tr.run_step()
    tr.log.close()
    assert "estimator" not in tr.log.header.extra and "loss" not in tr.log.header.extra
    tr2 = open_job(model, tmp_path / "job", ZOConfig(method="lora", steps=2, batch_size=4), CHOICES)
    assert (tr2.cfg.estimator, tr2.cfg.q, tr2.loss) == ("mezo", 1, "tokens")
    tr2.run_step()


def test_candidate_ce_by_hand():
    """The candidate CE over a batch is what F.cross_entropy gives on the candidate scores (sanity)."""
    logits = torch.randn(2, 5, VOCAB)
    chs = [
        D.ChoiceExample((1, 2, 3), ((11,), (12,), (13,)), 2),
        D.ChoiceExample((4, 5, 6, 7), ((20,), (21,)), 0),
    ]
    rows, index = LS.candidate_rows(chs)
    ll = LS.candidate_loglik(logits, index)
    ce = LS.candidate_ce(ll, index)
    lp0 = torch.log_softmax(logits[0, 2], -1)[[11, 12, 13]]
    lp1 = torch.log_softmax(logits[1, 3], -1)[[20, 21]]
    want = [F.cross_entropy(lp0[None], torch.tensor([2])), F.cross_entropy(lp1[None], torch.tensor([0]))]
    assert ce.tolist() == pytest.approx([float(w) for w in want], rel=1e-6)
    assert len(rows) == 2
