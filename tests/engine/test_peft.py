"""LoRA adapters in PEFT format: the engine's exported adapter loads in PEFT and gives the same logits
as the engine's own LoRA forward (fresh and trained), and PEFT-made adapters load into the engine."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.test_trainer import (
    base_cfg,
    engine_logits,
    open_job,
)
from zostream.engine.errors import RequestError
from zostream.engine.finetune import export
from zostream.engine.peft import LoraAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(1, 101, (2, 10), generator=torch.Generator().manual_seed(11))


def lora_fn(ad: LoraAdapter):
    return lambda i: {m: [lw] for m, lw in ad.layer(i).items()}


@pytest.mark.parametrize("steps", [0, 4])
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_exported_adapter_loads_in_peft_with_the_same_logits(models, tmp_path, name, steps):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = models(name)
    cfg = base_cfg("lora", steps=max(steps, 1), lr=5e-2, lora_targets=("v_proj", "q_proj", "k_proj"))
    tr = open_job(model, tmp_path / "job", cfg)
    for _ in range(steps):
        tr.run_step()
    out = export(tr, tmp_path / "job", base_model=str(model))
    assert out == tmp_path / "job" / "adapter"
    saved = load_file(out / "adapter_model.safetensors")
    b_norm = sum(float(t.abs().sum()) for n, t in saved.items() if ".lora_B." in n)
    assert (b_norm > 0) == (steps > 0)  # PEFT init: B = 0 until trained
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(hf, out).eval()
    assert not [w for w in caught if "zostream" in str(w.message) or "Unexpected" in str(w.message)]
    live = {n.replace(".default.weight", ".weight"): p for n, p in pm.named_parameters() if "lora_" in n}
    assert sorted(live) == sorted(saved)
    assert all(torch.equal(live[n].detach(), t) for n, t in saved.items())
    with torch.no_grad():
        want = pm(IDS).logits
    got = engine_logits(tr.streamer, tr.fam, tr.spec, IDS, lora_fn(tr.served_adapter()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if steps:  # the trained adapter changes the output (the check above is not base vs base)
        plain = engine_logits(tr.streamer, tr.fam, tr.spec, IDS)
        assert (plain - want).abs().max() > 1e-3
    back = LoraAdapter.load_peft(out, tr.fam, tr.spec, torch.device("cpu"))
    served = tr.served_adapter()  # the average of the factors (the defaults keep one)
    assert back.spec == served.spec  # r, alpha, targets and the init seed survive the round trip
    assert sorted(back.tensors) == sorted(served.tensors)
    assert all(torch.equal(back.tensors[n], t) for n, t in served.tensors.items())
    tr.log.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_peft_made_adapter_loads_into_the_engine(models, tmp_path, name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = models(name)
    torch.manual_seed(0)  # PEFT's init_lora_weights=False draws B from the global RNG
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        LoraConfig(
            r=4, lora_alpha=12, target_modules=["v_proj", "q_proj"], lora_dropout=0.0, init_lora_weights=False
        ),
    ).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = pm(IDS).logits
    tr = open_job(model, tmp_path / "job", base_cfg("lora"))
    ad = LoraAdapter.load_peft(tmp_path / "peft", tr.fam, tr.spec, torch.device("cpu"))
    assert (ad.spec.r, ad.spec.alpha, ad.spec.targets) == (4, 12.0, ("q_proj", "v_proj"))
    got = engine_logits(tr.streamer, tr.fam, tr.spec, IDS, lora_fn(ad))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (engine_logits(tr.streamer, tr.fam, tr.spec, IDS) - want).abs().max() > 1e-3
    tr.log.close()


@pytest.mark.parametrize(
    "option", [{"use_rslora": True}, {"use_dora": True}, {"rank_pattern": {"q_proj": 2}}]
)
def test_adapter_with_options_that_change_the_math_is_refused(models, tmp_path, option):
    """rsLoRA scales by alpha / sqrt(r), DoRA adds a magnitude term: serving them as plain LoRA would give
    silently different logits, so loading names the option instead."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = models("llama")
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **option),
    )
    pm.save_pretrained(tmp_path / "peft")
    tr = open_job(model, tmp_path / "job", base_cfg("lora"))
    with pytest.raises(RequestError, match=next(iter(option))) as err:
        LoraAdapter.load_peft(tmp_path / "peft", tr.fam, tr.spec, torch.device("cpu"))
    assert err.value.field == "adapter"
    tr.log.close()


def test_all_linear_is_stored_resolved_and_resumes(models, tmp_path):
    """ "all-linear" is stored as the modules it resolved to (the log header and the exported adapter_config
    list them, as PEFT saves its shorthand); the job reopens when asked for all-linear or for those names,
    refuses another set naming lora_targets, and a bad target list leaves no job directory behind."""
    from zostream.engine.resume import resume_config
    from zostream.engine.store import WeightStore

    model = models("llama")
    cfg = base_cfg("lora", steps=2, lora_targets=("all-linear",))
    tr = open_job(model, tmp_path / "job", cfg)
    for _ in range(cfg.steps):
        tr.run_step()
    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # Llama's blocks
    assert tr.log.header.scope["targets"] == names
    out = export(tr, tmp_path / "job", base_model=str(model))
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == names
    tr.log.close()
    store, log = WeightStore(model), tmp_path / "job" / "update.log"
    for ask in (("all-linear",), tuple(reversed(names))):
        assert resume_config(dataclasses.replace(cfg, lora_targets=ask), store, log).lora_targets == ask
    with pytest.raises(RequestError, match="targets=") as err:
        resume_config(dataclasses.replace(cfg, lora_targets=("q_proj",)), store, log)
    assert err.value.field == "lora_targets"
    for bad, why in ((("all-linear", "q_proj"), "give it alone"), (("nope_proj",), "unknown module")):
        with pytest.raises(RequestError, match=why) as err:
            open_job(model, tmp_path / "bad", dataclasses.replace(cfg, lora_targets=bad))
        assert err.value.field == "lora_targets" and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_peft_adapter_saved_with_a_pattern_or_all_linear_loads(models, tmp_path, name):
    """PEFT saves a string target_modules as given and reads it as a regular expression fullmatched against
    each module's full name ("all-linear" aside), and a list entry as a full name or its dotted suffix: an
    adapter PEFT made from a pattern loads into the engine with PEFT's logits, one saved as "all-linear" loads
    as every module, one saved from ["self_attn.q_proj", "v_proj", "c_attn"] as q_proj and v_proj, and a
    pattern or list that picks modules in some layers only (or none) is refused naming the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = models(name)
    torch.manual_seed(0)  # init_lora_weights=False draws B from the global RNG
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|v_proj)", init_lora_weights=False),
    ).eval()
    pm.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["target_modules"] == r".*\.(k_proj|v_proj)"  # PEFT kept the pattern, not a list
    with torch.no_grad():
        want = pm(IDS).logits
    tr = open_job(model, tmp_path / "job", base_cfg("lora"))
    ad = LoraAdapter.load_peft(tmp_path / "peft", tr.fam, tr.spec, torch.device("cpu"))
    assert ad.spec.targets == ("k_proj", "v_proj")
    torch.testing.assert_close(engine_logits(tr.streamer, tr.fam, tr.spec, IDS, lora_fn(ad)), want)

    every = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    every.save_pretrained(tmp_path / "every")
    cfg_path = tmp_path / "every" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = "all-linear"  # as a hand-written config would say it
    cfg_path.write_text(json.dumps(cfg))
    ad = LoraAdapter.load_peft(tmp_path / "every", tr.fam, tr.spec, torch.device("cpu"))
    assert ad.spec.targets == tuple(sorted(tr.fam.module_names(tr.spec)))

    for pattern, why in (
        (r".*layers\.0\..*q_proj", "different modules"),
        ("nothing_here", "no module"),
        ("(", "not a regular expression"),
    ):
        cfg["target_modules"] = pattern
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(RequestError, match=why) as err:
            LoraAdapter.load_peft(tmp_path / "every", tr.fam, tr.spec, torch.device("cpu"))
        assert err.value.field == "adapter"

    suffixed = get_peft_model(  # list entries match a full name's dotted suffix; "c_attn" matches nothing
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["self_attn.q_proj", "v_proj", "c_attn"]),
    )
    suffixed.save_pretrained(tmp_path / "suffixed")
    ad = LoraAdapter.load_peft(tmp_path / "suffixed", tr.fam, tr.spec, torch.device("cpu"))
    assert ad.spec.targets == ("q_proj", "v_proj")
    for names, why in ((["layers.0.self_attn.q_proj"], "different modules"), (["c_attn"], "no module")):
        cfg["target_modules"] = names
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(RequestError, match=why) as err:
            LoraAdapter.load_peft(tmp_path / "every", tr.fam, tr.spec, torch.device("cpu"))
        assert err.value.field == "adapter"

    head = get_peft_model(  # the pattern picks q_proj in every block and the LM head besides
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.q_proj|lm_head"),
    )
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(RequestError, match="lm_head") as err:
        LoraAdapter.load_peft(tmp_path / "head", tr.fam, tr.spec, torch.device("cpu"))
    assert err.value.field == "adapter"
    tr.log.close()
