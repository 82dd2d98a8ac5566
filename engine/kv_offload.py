"""The KV of streamed layers in host memory, travelling with its layer in the streamer's copy streams.

With `LimitsConfig.kv_offload` on a copying device (CUDA or emu), the block pool of every streamed
layer lives in host memory (pinned on CUDA) and the device holds one staging pool per streaming
slot, so device KV memory is resident layers' pools + depth staging pools, whatever the model depth.
Per pass:
- `arm(views)`: the engine hands over the pass's PagedViews; the blocks they touch (U, sorted) get
  staging-local indices, and each view gets local read/write positions.
- `upload(i, s, h2d)`: issued by the streamer right after block i's weights, on the same H2D
  stream: layer i's blocks U, K and V, go host pool -> slot s's staging (one copy per run of
  consecutive block ids). A layer's next upload waits for its last write-back (`landed[i]`).
- attention reads and writes the staging (PagedView.update through `staging(i)`).
- `download(i, s, d2h, done)`: after block i's compute, on the D2H stream: the rows of the new
  tokens go back to the host pool (one copy per run of consecutive positions); the streamer records
  the slot free only after them.
Uploads the streamer issued before the pass's views were known (the next pass's first blocks are
prefetched at the end of a pass) are issued at `start_pass`, still before their compute.

The streamer stays the only owner of streams and events: this class only enqueues copies on the
streams it is handed and records its `landed` events on them.
"""

from __future__ import annotations

from typing import Any

import torch

from .kv_cache import PagedKVCache, PagedView


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of maximal runs where both src and dst are consecutive."""
    out: list[tuple[int, int, int]] = []
    for a, b in zip(src, dst, strict=True):
        if out and out[-1][0] + out[-1][2] == a and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((a, b, 1))
    return out


class KVOffload:
    def __init__(self, cache: PagedKVCache, layers: tuple[int, ...], dev: Any, depth: int) -> None:
        """layers: the streamed layers (their pools in cache are host memory); dev: the streamer's device
        interface (empty / copy / event); depth: the streamer's slots."""
        self.cache, self.layers, self.dev = cache, frozenset(layers), dev
        k0 = cache.k[0]
        n, bs, hkv, d = k0.shape
        nbytes = n * bs * hkv * d * k0.element_size()
        # Slot s's staging: [N*bs, Hkv, D] for K and for V (room for every block of the pool).
        self.stage_k = [self._device(nbytes, k0) for _ in range(depth)]
        self.stage_v = [self._device(nbytes, k0) for _ in range(depth)]
        self.device_bytes = 2 * depth * nbytes
        self.landed = {i: dev.event() for i in layers}
        self.bound: dict[int, int] = {}  # layer -> slot whose staging it reads this pass
        self.pending: dict[int, int] = {}  # slot -> layer whose weights were issued before arm()
        self.armed = False
        self.up_runs: list[tuple[int, int, int]] = []  # (host flat row, staging row, rows)
        self.down_runs: list[tuple[int, int, int]] = []  # (staging row, host flat row, rows)
        self.h2d_bytes = 0
        self.d2h_bytes = 0

    def _device(self, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        return self.dev.empty(nbytes).view(like.dtype).view(-1, like.shape[2], like.shape[3])

    # ---- the pass (engine) -------------------------------------------------------------------------
    def arm(self, views: list[PagedView]) -> None:
        """Host-side index work only (the views keep host copies): no device synchronisation."""
        bs = self.cache.block_size
        reads = torch.cat([v.host_read.flatten() for v in views])
        writes = torch.cat([v.host_write for v in views]).unique()  # sorted
        used = torch.cat([reads // bs, writes // bs]).unique()  # sorted block ids U
        local = torch.full((self.cache.num_blocks,), -1, dtype=torch.int64)
        local[used] = torch.arange(len(used))
        for v in views:
            dev = v.read_pos.device
            v.local_read = (local[v.host_read // bs] * bs + v.host_read % bs).to(dev)
            v.local_write = (local[v.host_write // bs] * bs + v.host_write % bs).to(dev)
        ids = used.tolist()
        self.up_runs = [(a * bs, b * bs, n * bs) for a, b, n in _runs(ids, list(range(len(ids))))]
        self.down_runs = _runs((local[writes // bs] * bs + writes % bs).tolist(), writes.tolist())
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        self.bound.clear()

    def staging(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.bound[layer]
        return self.stage_k[s], self.stage_v[s]

    # ---- the streamer's hooks ----------------------------------------------------------------------
    def upload(self, i: int, s: int, h2d: Any) -> bool:
        """Enqueue layer i's KV into slot s's staging after what h2d holds; False: not armed yet."""
        if i not in self.layers:
            return True
        if not self.armed:
            self.pending[s] = i
            return False
        h2d.wait_event(self.landed[i])
        hk, hv = self._host(i)
        for a, b, n in self.up_runs:
            self.dev.copy(self.stage_k[s][b : b + n], hk[a : a + n], h2d, f"kv h2d {i}")
            self.dev.copy(self.stage_v[s][b : b + n], hv[a : a + n], h2d, f"kv h2d {i}")
            self.h2d_bytes += 2 * n * hk[0].numel() * hk.element_size()
        self.bound[i] = s
        return True

    def take_pending(self) -> list[tuple[int, int]]:
        """(layer, slot) uploads still owed, once armed (a later issue into a slot supersedes)."""
        if not self.armed:
            return []
        out, self.pending = [(i, s) for s, i in self.pending.items()], {}
        return out

    def download(self, i: int, s: int, d2h: Any, done: Any) -> bool:
        """Enqueue the new rows of layer i back to the host after `done`; False: nothing to copy."""
        if i not in self.layers or not self.armed or not self.down_runs:
            return False
        d2h.wait_event(done)
        hk, hv = self._host(i)
        for a, b, n in self.down_runs:
            self.dev.copy(hk[b : b + n], self.stage_k[s][a : a + n], d2h, f"kv d2h {i}")
            self.dev.copy(hv[b : b + n], self.stage_v[s][a : a + n], d2h, f"kv d2h {i}")
            self.d2h_bytes += 2 * n * hk[0].numel() * hk.element_size()
        self.landed[i].record(d2h)
        return True

    def _host(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cache.k[i], self.cache.v[i]
        return k.view(-1, k.shape[2], k.shape[3]), v.view(-1, v.shape[2], v.shape[3])
