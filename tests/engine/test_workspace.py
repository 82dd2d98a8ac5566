"""Reused host buffers (engine/workspace.py): the head's logits and the outer tensors' ± copies are
written into buffers a job keeps between steps; the values are those of fresh tensors, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zostream.engine import fused, zo
from zostream.engine.models import llama
from zostream.engine.workspace import Workspace

CPU = torch.device("cpu")


def test_take_grows_and_reuses_one_buffer():
    ws = Workspace()
    a = ws.take((3, 5), torch.bfloat16, CPU)
    b = ws.take((2, 5), torch.bfloat16, CPU)
    assert a.shape == (3, 5) and b.shape == (2, 5) and a.data_ptr() == b.data_ptr()
    c = ws.take((4, 5), torch.bfloat16, CPU)  # larger: a new buffer
    assert c.shape == (4, 5) and c.numel() == 20
    assert ws.take((2, 2), torch.float32, CPU).dtype == torch.float32
    assert ws.take((2, 2), torch.float32, torch.device("meta")) is None  # off the CPU: no buffer


def test_named_buffers_keep_their_memory():
    ws = Workspace()
    a = ws.buffer(("w", 0, 1), 10, torch.bfloat16, CPU)
    assert ws.buffer(("w", 0, 1), 10, torch.bfloat16, CPU) is a
    assert ws.buffer(("w", 0, -1), 10, torch.bfloat16, CPU) is not a
    assert ws.buffer(("w", 0, 1), 12, torch.bfloat16, CPU).numel() == 12  # another size: replaced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_into_buffer_equals_head(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g).to(dtype)
    outer = {"model.embed_tokens.weight": torch.randn(50, 16, generator=g).to(dtype)}
    outer["model.norm.weight"] = torch.rand(16, generator=g).to(dtype)
    spec = type("S", (), {"eps": 1e-5, "tied": True})()
    want = F.linear(llama.rms_norm(h, outer["model.norm.weight"], 1e-5), outer["model.embed_tokens.weight"])
    buf = Workspace().take((7, 50), dtype, CPU)
    got = llama.head(h, outer, spec, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)


@pytest.mark.skipif(fused.noise_cpu is None, reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_into_buffers_equals_fresh(dtype):
    theta = torch.randn(4, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    plus, minus = zo.perturbed_pair(theta, "gaussian", 7, "w", 1e-3, dtype)
    bufs = (torch.full((132,), 9.0, dtype=dtype), torch.full((132,), 9.0, dtype=dtype))
    p2, m2 = zo.perturbed_pair(theta, "gaussian", 7, "w", 1e-3, dtype, out=bufs)
    assert p2.data_ptr() == bufs[0].data_ptr() and m2.data_ptr() == bufs[1].data_ptr()
    assert torch.equal(p2, plus) and torch.equal(m2, minus)
    one = zo.perturbed(theta, "gaussian", 7, "w", 1e-3, 1, dtype, out=torch.zeros(132, dtype=dtype))
    assert torch.equal(one, plus)


def test_perturbed_refuses_a_wrong_buffer():
    theta = torch.zeros(10)
    with pytest.raises(ValueError, match="out: flat contiguous"):
        zo.perturbed_pair(
            theta, "gaussian", 1, "w", 1e-3, torch.float32, out=(torch.zeros(9), torch.zeros(10))
        )
