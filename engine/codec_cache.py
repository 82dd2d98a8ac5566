"""The on-disk cache of a model's packed blocks: encoded once per model, codec and blocksize, mmap'd later.

engine/codecs.py defines the packed formats; this module stores them (one safetensors file per block and
a manifest written last, so an interrupted build resumes) and hands out a block's parts as mmap views.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .codecs import FORMAT, Codec, Layout, block_layout, encode_block, get_codec, layout_nbytes
from .config import CodecConfig
from .errors import ModelError
from .store import WeightStore, open_safetensors, read_safetensors_header, save_safetensors


def default_cache_root() -> Path:
    """$ZOSTREAM_CACHE_DIR/codecs, else <user cache dir>/zostream/codecs."""
    env = os.environ.get("ZOSTREAM_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "codecs"
    import platformdirs

    return Path(platformdirs.user_cache_dir("zostream")) / "codecs"


def _dense_layout(store: WeightStore, i: int) -> Layout:
    prefix = store.family.layer_prefix(i)
    infos = [store.infos[prefix + local] for local in store.family.block_tensors(store.spec)]
    return {info.name[len(prefix) :]: (info.shape, info.dtype) for info in infos}


def _key_layout(tensors: dict[str, Any]) -> Layout:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


class CodecCache:
    """One model's packed blocks under root/<fingerprint>/<codec>-b<blocksize>/, mmap'd on use.

    block_{i:05d}.safetensors per block (atomic writes, header metadata names the model and
    codec), then manifest.json, written LAST and atomically: without it the cache is not
    ready, and build() resumes, keeping every block file whose header is complete and right.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, codec: Codec, blocksize: int) -> None:
        if getattr(codec, "blocksize", blocksize) != blocksize:
            raise ValueError(f"codec {codec.name} has blocksize {codec.blocksize}, not {blocksize}")
        self.fingerprint, self.codec, self.blocksize = fingerprint, codec, blocksize
        self.dir = Path(root) / fingerprint / f"{codec.name}-b{blocksize}"
        self.meta = {
            "format": str(FORMAT),
            "fingerprint": fingerprint,
            "codec": codec.name,
            "blocksize": str(blocksize),
            "table": codec.table_digest(),
        }
        self._manifest: dict[str, Any] | None = None
        self._blocks: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def block_path(self, i: int) -> Path:
        return self.dir / f"block_{i:05d}.safetensors"

    def ready(self) -> bool:
        """Manifest present and for this model/codec/table, and every block file at its recorded size."""
        try:
            m = json.loads(self.manifest_path.read_text())
            ok = m.get("meta") == self.meta and all(
                self.block_path(i).stat().st_size == b["size"] for i, b in enumerate(m["blocks"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self._manifest = m if ok else None
        return ok

    def _valid(self, i: int, expected: Layout) -> bool:
        try:
            infos, meta = read_safetensors_header(self.block_path(i))
        except (OSError, ModelError):
            return False
        return meta == {**self.meta, "block": str(i)} and _key_layout(infos) == expected

    def build(
        self, store: WeightStore, device: torch.device | str | None = None, progress: bool = True
    ) -> None:
        """Encode every block not already on disk and valid, then write the manifest."""
        from tqdm import tqdm

        if store.fingerprint != self.fingerprint:
            raise ValueError(f"store fingerprint {store.fingerprint} does not match cache {self.fingerprint}")
        self.dir.mkdir(parents=True, exist_ok=True)
        blocks = []
        desc = f"{self.codec.name} encode"
        for i in tqdm(
            range(store.num_layers), desc=desc, unit="block", file=sys.stderr, disable=not progress
        ):
            expected = block_layout(self.codec, _dense_layout(store, i))
            path = self.block_path(i)
            if not self._valid(i, expected):
                packed = encode_block(self.codec, store.block(i), device)
                if _key_layout(packed) != expected:  # a codec bug: the file would never validate
                    raise RuntimeError(f"{self.codec.name} codec produced an unexpected layout for block {i}")
                save_safetensors(packed, path, metadata={**self.meta, "block": str(i)})
            blocks.append({"file": path.name, "size": path.stat().st_size, "nbytes": layout_nbytes(expected)})
        manifest = {"meta": self.meta, "model": str(store.dir), "blocks": blocks}
        tmp = self.manifest_path.with_name("manifest.json.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest_path)
        self._manifest, self._blocks = manifest, {}

    def _require(self) -> dict[str, Any]:
        if self._manifest is None and not self.ready():
            raise ModelError(f"codec cache {self.dir} is not built; open it with open_codec_cache()")
        assert self._manifest is not None
        return self._manifest

    def block(self, i: int) -> dict[str, torch.Tensor]:
        """Packed block i ("local::part" -> host tensor) as mmap views of the cache file."""
        self._require()
        if i not in self._blocks:
            self._blocks[i] = open_safetensors(self.block_path(i))
        return self._blocks[i]

    def block_nbytes(self, i: int) -> int:
        """Bytes of block i that cross the link (tensor data, no file header)."""
        return int(self._require()["blocks"][i]["nbytes"])


def open_codec_cache(
    store: WeightStore, cfg: CodecConfig, device: torch.device | str | None = None, progress: bool = True
) -> CodecCache | None:
    """The packed cache for `store` under cfg: None for "none"; encoded now unless already on disk."""
    if cfg.name == "none":
        return None
    codec = get_codec(cfg)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root()
    cache = CodecCache(root, store.fingerprint, codec, cfg.blocksize)
    if not cache.ready():
        msg = f"zostream: encoding {store.dir.name} with {codec.name} into {cache.dir}"
        print(msg, file=sys.stderr, flush=True)
        cache.build(store, device, progress)
    return cache
