"""--dtype auto: the model's dtype, except on a CPU without fast kernels for it (float32 there).

The probe (engine_setup.cpu_has_fast_kernels) is checked against an independent reference, the CPU's own
feature flags in /proc/cpuinfo (oneDNN's bf16 matrix kernels need AVX-512 core, or AVX2-VNNI-2's
AVX-NE-CONVERT); the rule is checked with the probe's answer forced both ways, through the engine.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.test_generation import PROMPTS, FakeTok, greedy, hf_greedy
from tests.tiny import make_tiny_model
from zostream.engine import engine_setup as setup
from zostream.engine.config import EngineConfig, LimitsConfig
from zostream.engine.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 feature flags only")
def test_bf16_probe_agrees_with_the_cpu_flags():
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags")
    avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    expected = avx512_core or "avx_ne_convert" in flags
    assert setup.cpu_has_fast_kernels(torch.bfloat16) is expected, sorted(f for f in flags if "avx" in f)


def test_float32_needs_no_probe():
    assert setup.cpu_has_fast_kernels(torch.float32) is True


@pytest.mark.parametrize("fast", [True, False])
def test_auto_rule(monkeypatch, fast):
    monkeypatch.setattr(setup, "cpu_has_fast_kernels", lambda dtype: fast)
    slow_cpu = torch.bfloat16 if fast else torch.float32
    assert setup.compute_dtype("auto", torch.bfloat16, "cpu") == slow_cpu
    assert setup.compute_dtype("auto", torch.float16, "cpu") == (torch.float16 if fast else torch.float32)
    assert setup.compute_dtype("auto", torch.float32, "cpu") == torch.float32
    # The emulated device stands for a GPU: the model's dtype wherever it runs.
    assert setup.compute_dtype("auto", torch.bfloat16, "emu") == torch.bfloat16
    # An explicit --dtype is what it says, on any device.
    assert setup.compute_dtype("bfloat16", torch.float32, "cpu") == torch.bfloat16
    assert setup.compute_dtype("float32", torch.bfloat16, "emu") == torch.float32
    if not torch.cuda.is_available():  # auto without CUDA is the CPU
        assert setup.compute_dtype("auto", torch.bfloat16, "auto") == slow_cpu


def test_auto_keeps_the_model_dtype_when_float32_copies_would_not_fit(monkeypatch, caplog):
    """The mmap'd weights are used in place only in their own dtype: float32 means a copy of every weight.
    A base whose copies would take over half the RAM, or one run under --host-memory (larger than RAM),
    keeps the model's dtype, with a warning saying so and how to force float32."""
    monkeypatch.setattr(setup, "cpu_has_fast_kernels", lambda dtype: False)
    monkeypatch.setattr(setup, "ram_bytes", lambda: 8 * 2**30)
    assert setup.compute_dtype("auto", torch.bfloat16, "cpu", num_params=2**30) == torch.float32  # 4 GiB
    caplog.clear()
    assert setup.compute_dtype("auto", torch.bfloat16, "cpu", num_params=2**30 + 1) == torch.bfloat16
    assert "--dtype float32" in caplog.text
    assert setup.compute_dtype("auto", torch.bfloat16, "cpu", 1000, host_memory=2**20) == torch.bfloat16
    assert setup.compute_dtype("float32", torch.bfloat16, "cpu", 2**40, host_memory=2**20) == torch.float32


@pytest.mark.parametrize("fast", [True, False])
def test_engine_on_a_bf16_base_computes_in_the_resolved_dtype(monkeypatch, tmp_path, fast):
    """The engine takes the rule's dtype and generates with it; in float32 its greedy tokens are those of
    transformers on the same bf16 weights loaded as float32 (an independent forward)."""
    monkeypatch.setattr(setup, "cpu_has_fast_kernels", lambda dtype: fast)
    d = make_tiny_model(tmp_path, "llama", dtype=torch.bfloat16)
    cfg = EngineConfig(str(d), device="cpu", limits=LimitsConfig(max_batch=4, max_seq_len=64))
    e = Engine(cfg, tokenizer=FakeTok())
    want = torch.bfloat16 if fast else torch.float32
    assert e.store.dtype == torch.bfloat16
    assert e.dtype == want
    out = e.generate([greedy(str(i), p) for i, p in enumerate(PROMPTS)])
    assert all(len(out[str(i)].token_ids) == 8 for i in range(len(PROMPTS)))
    if not fast:
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for i, p in enumerate(PROMPTS):
            assert list(out[str(i)].token_ids) == hf_greedy(ref, p), (i, p)
