"""The grzo estimator (q groups of records, each with its own LoRA direction, in one ± pair of forwards).

- every group's L±_d against a cross-entropy (or token NLL) written here on transformers + peft logits,
  each group run on its own with θ ± ε z_d: an independent reference (mixed-adapter rows vs one
  adapter per forward), on candidate batches with one row per record and with a row per candidate;
- the logged coefficients are Δ_d / rms(Δ) of those reference losses;
- a grzo log replays to the trained adapter bitwise, and training under a streaming budget writes the
  same log as training resident (bookkeeping: both sides run the engine);
- config errors name the field.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine.test_losses import CHOICES, choice_dataset, hf_ce, peft_model, spy_losses
from tests.engine.test_trainer import (
    PAD,
    TextbookMeZO,
    assert_same_tensors,
    check_runs_match_textbook,
    exported,
    open_job,
    partial_budget,
)
from zostream.engine import data as D
from zostream.engine import estimators as E
from zostream.engine import rng, zo
from zostream.engine.batching import batch_order, collate
from zostream.engine.config import ZOConfig
from zostream.engine.finetune import export

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("ds", "q", "targets"),
    [
        (CHOICES, 4, ("q_proj", "v_proj")),
        (choice_dataset(multi=False), 2, ("q_proj", "v_proj")),
        (CHOICES, 4, ("all-linear",)),  # every projection, the MLP's too; PEFT resolves the shorthand itself
    ],
)
def test_group_losses_match_transformers(models, tmp_path, ds, q, targets):
    model = models("llama")
    cfg = ZOConfig(
        method="lora", steps=2, batch_size=4, seed=5, eps=0.05, q=q, estimator="grzo", lora_targets=targets
    )
    tr = open_job(model, tmp_path / "job", cfg, ds)
    assert tr.loss == "candidates"
    seen = spy_losses(tr)
    hf = peft_model(model, cfg)
    names = {n: n.replace(".weight", ".default.weight") for n in tr.adapter.tensors}
    assert sorted(names.values()) == sorted(n for n, _ in hf.named_parameters() if "lora_" in n)
    per = cfg.batch_size // q
    with torch.inference_mode():
        for t in range(cfg.steps):
            tr.flush()
            master = {n: tr.adapter.tensors[n].clone() for n in names}
            tr.run_step()
            idx = batch_order(len(ds.choices), cfg.batch_size, cfg.seed, t)
            want = []
            for sign in (1, -1):
                for d in range(q):
                    seed = rng.step_seed(cfg.seed, t, d)
                    pert = {
                        names[n]: zo.perturbed(v, cfg.noise, seed, n, cfg.epsilon, sign, torch.float32)
                        for n, v in master.items()
                    }
                    chs = [ds.choices[i] for i in idx[d * per : (d + 1) * per]]
                    want.append(hf_ce(hf, pert, chs, "mean"))
            got = [lp for lp, _ in seen[t]] + [lm for _, lm in seen[t]]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
            deltas = [want[d] - want[q + d] for d in range(q)]
            rms = math.sqrt(sum(x * x for x in deltas) / q)
            assert list(tr.steps[t].directions) == pytest.approx([x / rms for x in deltas], rel=1e-4)
            assert len({round(x, 9) for x in want}) > q  # the directions moved the loss: not vacuous


def test_token_loss_groups_and_micro_batches(models, tmp_path):
    """Token loss: group d's L = its records' summed NLL over their target tokens, also when the batch
    runs as micro-batches that split a group (the column sums add up across micro-batches)."""
    model = models("llama")
    ds = choice_dataset(multi=False)
    whole = ZOConfig(
        method="lora", steps=1, batch_size=4, seed=2, eps=0.05, q=2, estimator="grzo", loss="tokens"
    )
    tr = open_job(model, tmp_path / "a", whole, ds)
    seen = spy_losses(tr)
    tr.run_step()
    micro = ZOConfig(**{**whole.__dict__, "micro_batch": 1})
    tr2 = open_job(model, tmp_path / "b", micro, ds)
    seen2 = spy_losses(tr2)
    tr2.run_step()
    assert [x for p in seen2[0] for x in p] == pytest.approx([x for p in seen[0] for x in p], rel=1e-5)
    idx = batch_order(len(ds.examples), 4, whole.seed, 0)
    hf = peft_model(model, whole)
    names = {n: n.replace(".weight", ".default.weight") for n in tr.adapter.tensors}
    with torch.inference_mode():
        for d in range(2):
            seed = rng.step_seed(whole.seed, 0, d)
            pert = {
                names[n]: zo.perturbed(v, whole.noise, seed, n, whole.epsilon, 1, torch.float32)
                for n, v in tr2.adapter.tensors.items()
            }
            nll, count = 0.0, 0
            for i in idx[2 * d : 2 * d + 2]:
                ex = ds.examples[i]
                logits = torch.func.functional_call(hf, pert, (torch.tensor([ex.input_ids]),)).logits[0]
                logp = torch.log_softmax(logits.double(), -1)
                for p, lab in enumerate(ex.labels[1:]):
                    if lab != D.IGNORE:
                        nll -= float(logp[p, lab])
                        count += 1
            assert seen2[0][d][0] == pytest.approx(nll / count, rel=1e-5)


def test_replay_and_streaming_are_bitwise(models, tmp_path):
    from zostream.engine.replay import replay_lora
    from zostream.engine.store import WeightStore
    from zostream.engine.update_log import UpdateLog

    model = models("llama")
    cfg = ZOConfig(method="lora", steps=3, batch_size=4, seed=3, estimator="grzo")
    assert cfg.q == 4
    logs = []
    for budget in (None, partial_budget(model)):
        job = tmp_path / f"job-{budget}"
        tr = open_job(model, job, cfg, CHOICES, budget=budget)
        for _ in range(cfg.steps):
            assert tr.run_step()["skipped"] is None
        export(tr, job)
        tr.log.close()
        logs.append((job / "update.log").read_bytes())
        log = UpdateLog.open(job / "update.log", repair=False)
        assert log.header.extra["estimator"] == "grzo" and log.header.q == 4
        got = replay_lora(WeightStore(model), log)
        log.close()
        assert_same_tensors(dict(got.tensors), exported(job, "lora"))
    assert logs[0] == logs[1]


def test_coefficients_and_config():
    assert E.forwards("grzo", 4) == [(E.GROUPED, 1), (E.GROUPED, -1)]
    assert E.pairs("grzo", [3.0, 1.0, 1.0, 2.0]) == [(3.0, 1.0), (1.0, 2.0)]
    # Δ = (2, -1): rms = sqrt(2.5)
    got = E.coefficients("grzo", [(3.0, 1.0), (1.0, 2.0)], 1e-2)
    assert got == pytest.approx([2 / math.sqrt(2.5), -1 / math.sqrt(2.5)], rel=1e-6)
    assert E.coefficients("grzo", [(1.0, 1.0), (2.0, 2.0)], 1e-2) == [0.0, 0.0]
    assert all(math.isnan(c) for c in E.coefficients("grzo", [(math.nan, 1.0), (2.0, 1.0)], 1e-2))
    assert [E.group_of(p, 16, 4) for p in (0, 3, 4, 15)] == [0, 0, 1, 3]
    assert ZOConfig(estimator="grzo", batch_size=16).q == 4
    assert ZOConfig(estimator="grzo", batch_size=9).q == 3
    full = ZOConfig(method="full", estimator="grzo")
    assert (full.q, full.learning_rate, full.epsilon, full.schedule) == (4, 2e-3, 1e-3, "cosine")
    with pytest.raises(ValueError, match="^q: grzo"):
        ZOConfig(estimator="grzo", batch_size=8, q=3)


class TextbookGRZO(TextbookMeZO):
    """grzo on full parameters as the paper's loop would run it, every weight resident: the batch cut into
    q groups of B/q consecutive records, group d run on its own through θ + ε z_d and θ - ε z_d (token
    loss), Δ_d = L+_d - L-_d, c_d = Δ_d / rms(Δ), θ ← θ - η (1/q Σ_d c_d z_d + wd θ), a direction's term only
    where its θ+ and θ- differ (float32 masters)."""

    @torch.inference_mode()
    def step(self, t: int) -> None:
        cfg = self.cfg
        idx = batch_order(len(self.ds.examples), cfg.batch_size, cfg.seed, t)
        per = cfg.batch_size // cfg.q
        pairs, differ = [], []
        for d in range(cfg.q):
            group = collate([self.ds.examples[i] for i in idx[d * per : (d + 1) * per]], PAD)
            seed = rng.step_seed(cfg.seed, t, d)
            plus, minus = (
                {
                    n: zo.perturbed(v, cfg.noise, seed, n, cfg.epsilon, s, torch.float32)
                    for n, v in self.master.items()
                }
                for s in (1, -1)
            )
            pairs.append((self.loss(plus, None, group), self.loss(minus, None, group)))
            differ.append({n: plus[n] != minus[n] for n in self.master})
        deltas = [lp - lm for lp, lm in pairs]
        rms = math.sqrt(sum(x * x for x in deltas) / cfg.q)
        cs = [zo.f32(x / rms) for x in deltas]
        self.history.append((pairs, cs, self.update(t, cs, differ)))


def test_full_parameter_grzo_matches_textbook_bitwise(models, tmp_path):
    """Full parameters: every micro-batch holds one group and runs that group's θ ± ε z_d (the trainer cuts
    the batch at the groups' edges); resident, streamed and fully streamed runs log the textbook's bytes
    and end at its weights."""
    model = models("llama")
    cfg = ZOConfig(
        method="full",
        steps=3,
        batch_size=4,
        seed=7,
        q=2,
        lr=2e-3,
        eps=1e-3,
        loss="tokens",
        estimator="grzo",
        lr_schedule="cosine",
        weight_decay=0.05,
    )
    assert (cfg.learning_rate, cfg.epsilon) == (2e-3, 1e-3)
    ref = TextbookGRZO(model, cfg).run(cfg.steps)
    check_runs_match_textbook(model, tmp_path, cfg, ref)
    assert len({round(x, 9) for p, _, _ in ref.history for x in sum(p, ())}) > 4  # the loss moved


def test_full_parameter_grzo_cuts_micro_batches_at_groups(models, tmp_path):
    """A micro-batch larger than a group is cut at the group's edge: the same losses as groups run whole."""
    model = models("llama")
    base = dict(method="full", steps=1, batch_size=8, seed=4, q=4, estimator="grzo", loss="tokens")
    seen = []
    for mb in (None, 4, 1):
        tr = open_job(model, tmp_path / f"mb{mb}", ZOConfig(**base, micro_batch=mb))
        sizes = [int(b[0].shape[0]) for b in tr.batches(0)]
        assert sizes == ([1] * 8 if mb == 1 else [2] * 4)
        seen.append(spy_losses(tr))
        tr.run_step()
    assert seen[0] == seen[1]
    assert [x for p in seen[2][0] for x in p] == pytest.approx([x for p in seen[0][0] for x in p], rel=1e-5)


@pytest.mark.parametrize(("estimator", "one_at_a_time"), [("grzo", True), ("mezo", False)])
def test_full_parameter_grzo_holds_one_direction_of_its_copies(
    models, tmp_path, monkeypatch, estimator, one_at_a_time
):
    """Full-parameter grzo on a device with its own memory (the emulated GPU, every block streamed) makes
    a block's θ ± ε z_d when the first micro-batch of group d reaches it and drops them before the next
    direction's, and the outer tensors' likewise (drawn again for the head): 2 work copies live at a time,
    not 2q. Each direction of a block is drawn once. mezo with q pairs keeps all 2q (the control: the
    check can fail)."""
    import weakref

    from tests.engine.test_emu import emu

    model = models("llama")
    cfg = ZOConfig(method="full", steps=1, batch_size=8, seed=1, q=4, estimator=estimator, loss="tokens")
    tr = open_job(model, tmp_path / "job", cfg, budget=0, emu=emu())
    live: list[tuple[str, int, weakref.ref]] = []  # (block or outer, seed, a copy)
    calls: list[tuple[str, int]] = []
    others_alive = {"block": [], "outer": []}
    orig = zo.perturbed_pair

    def spy(t, kind, seed, name, *args, **kwargs):
        out = orig(t, kind, seed, name, *args, **kwargs)
        group = "block" if ".layers." in name else "outer"
        if group == "block":
            calls.append((name, seed))
        others_alive[group].append(sum(1 for g, s, r in live if g == group and s != seed and r() is not None))
        live.extend((group, seed, weakref.ref(x)) for x in out)
        return out

    monkeypatch.setattr(zo, "perturbed_pair", spy)
    tr.run_step()
    assert len(calls) == len(set(calls))  # every (block tensor, direction) drawn once
    assert len({s for _, s in calls}) == cfg.q
    assert (max(others_alive["block"]) == 0) is one_at_a_time
    assert (max(others_alive["outer"]) == 0) is one_at_a_time
