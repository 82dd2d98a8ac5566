"""One pass over the layers, carrying several workloads at once.

Everything the device does is a pass: embed → block 0 … block L-1 → head, with the
streamer delivering each block once. Every workload (a prefill batch, a decode batch,
the 2q perturbed forwards of a ZO step) runs its part of block i while block i is on
the device, so a streamed block crosses the link once per pass whatever the pass carries.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .streamer import LayerStreamer


class Workload(Protocol):
    def begin(self, outer: dict[str, torch.Tensor]) -> None:
        """Embed the inputs (outer weights on the device)."""

    def block(self, i: int, w: dict[str, torch.Tensor]) -> None:
        """Run block i with its weights on the device."""

    def end(self, outer: dict[str, torch.Tensor]) -> None:
        """Apply the head and keep what the caller needs (logits of last tokens, losses)."""


@torch.inference_mode()
def run_pass(streamer: LayerStreamer, workloads: list[Workload]) -> None:
    if not workloads:
        return
    outer = streamer.outer()
    with streamer.compute_memory():  # emu: activations, scores, logits are device memory too
        for wl in workloads:
            wl.begin(outer)
        with streamer.open_pass() as blocks:  # releases (and writes back) even when a workload raises
            for i, w in blocks:
                for wl in workloads:
                    wl.block(i, w)
        for wl in workloads:
            wl.end(outer)
