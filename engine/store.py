"""WeightStore: a Hugging Face model directory, memory-mapped read-only, never written.

Opening reads config.json and the safetensors headers only (a few KB per shard), so
the time does not grow with the model: tensor data is paged in by the OS when a block
is first touched. Tensors are views into a read-only shared mapping (PROT_READ,
MAP_SHARED): its pages are clean page cache, so a base larger than RAM maps without being
charged against the commit limit, the kernel can drop and re-read them under memory
pressure, and a read-only file or mount opens. A write through a view faults (SIGSEGV):
the base can never be modified.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .models import Family, family_for

_ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors header; check that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > 100 * 2**20:
            raise ModelError(f"{path}: corrupt safetensors header (length {hlen} for a {size}-byte file)")
        if hlen > size - 8:
            raise ModelError(
                f"{path}: truncated file: the header needs {8 + hlen} bytes but the file has {size}; "
                "re-download or re-convert the model"
            )
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype = _ST_DTYPES.get(h.get("dtype", ""))
            start, end = (int(x) for x in h["data_offsets"])
            shape = tuple(int(s) for s in h["shape"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: corrupt safetensors header entry for {name} ({exc!r})") from None
        if dtype is None:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {h.get('dtype')!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if start < 0 or end - start != nbytes:
            raise ModelError(f"{path}: tensor {name} spans {end - start} bytes but its shape needs {nbytes}")
        if base + end > size:
            raise ModelError(
                f"{path}: truncated file: tensor {name} ends at byte {base + end} but the file has "
                f"{size} bytes; re-download or re-convert the model"
            )
        infos[name] = TensorInfo(name, str(path), dtype, shape, base + start, nbytes)
    return infos, meta


class MappedFile:
    """One file mapped read-only and shared (a base or codec cache), or read-write and shared (a
    job-owned working copy, whose writes must reach its file)."""

    def __init__(self, path: str, writable: bool = False) -> None:
        self.path = path
        self.size = size = os.path.getsize(path)
        self.map: mmap.mmap | None = None
        if not size:
            self.data = None
        elif writable:
            self.data = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        else:
            self.map = map_readonly(path, size)
            with warnings.catch_warnings():
                # torch warns that the buffer is not writable: that is the point (a write faults).
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                self.data = torch.frombuffer(self.map, dtype=torch.uint8)

    def view(self, info: TensorInfo) -> torch.Tensor:
        assert self.data is not None
        raw = self.data[info.offset : info.offset + info.nbytes]
        if info.offset % info.dtype.itemsize:
            # Misaligned for a typed view (mixed-dtype files): copy this one tensor.
            raw = raw.clone()
        return raw.view(info.dtype).view(info.shape)


def map_readonly(path: str, size: int) -> mmap.mmap:
    """PROT_READ + MAP_SHARED: not charged against the commit limit (a private mapping is, and the
    kernel refuses one larger than RAM + swap); works on a 0444 file and a read-only mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError as exc:
        raise ModelError(f"{path}: cannot map {size} bytes read-only ({exc.strerror})") from None
    finally:
        os.close(fd)


def open_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file as read-only mmap views (no copy; a write faults)."""
    infos, _ = read_safetensors_header(Path(path))
    mf = MappedFile(str(path))
    return {name: mf.view(info) for name, info in infos.items()}


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write atomically (tmp + rename) so a crash never leaves a torn file behind."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WeightStore:
    """Read-only view of a model directory: config, family, and tensors grouped by block.

    Groups: "outer" (embeddings, positions, final norm, lm_head: always resident) and
    one group per decoder block, keyed by the block-local name ("self_attn.q_proj.weight").
    """

    def __init__(self, model_dir: str | os.PathLike, writable: bool = False) -> None:
        self.dir = Path(model_dir)
        self.writable = writable  # only job-owned working copies; never a base model
        if not self.dir.is_dir():
            raise ModelError(f"model directory {self.dir} does not exist or is not a directory")
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{self.dir}: missing config.json; pass a Hugging Face model directory")
        try:
            self.raw_config: dict[str, Any] = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{cfg_path}: invalid JSON ({exc})") from None
        self.hf_config = _hf_config(self.dir, self.raw_config)
        self.family: Family = family_for(self.hf_config)
        self.spec = self.family.make_spec(self.hf_config)
        self.infos = self._read_index()
        self._files: dict[str, MappedFile] = {}
        self._validate()
        self.dtype = self._weight_dtype()
        self.fingerprint = self._fingerprint()

    # ---- opening -------------------------------------------------------------------------
    def _read_index(self) -> dict[str, TensorInfo]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelError(f"{index}: invalid index ({exc})") from None
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = {}
            if not shards:
                raise ModelError(
                    f"{self.dir}: no *.safetensors files (only safetensors weights are supported)"
                )
        infos: dict[str, TensorInfo] = {}
        for shard in shards:
            path = self.dir / shard
            if not path.is_file():
                users = sorted(n for n, s in weight_map.items() if s == shard)[:3]
                raise ModelError(f"{self.dir}: missing shard {shard} (holds {', '.join(users)}, ...)")
            shard_infos, _ = read_safetensors_header(path)
            infos.update(shard_infos)
        for name, shard in weight_map.items():
            if name not in infos:
                raise ModelError(f"{self.dir / shard}: tensor {name} listed in the index is not in the file")
        return infos

    def _validate(self) -> None:
        for name, shape in self.family.expected_tensors(self.spec).items():
            info = self.infos.get(name)
            if info is None:
                raise ModelError(
                    f"{self.dir}: missing tensor {name} (a {self.spec.family} model with "
                    f"{self.spec.num_layers} layers needs it)"
                )
            if info.shape != tuple(shape):
                raise ModelError(
                    f"{info.file}: tensor {name} has shape {list(info.shape)} but config.json implies "
                    f"{list(shape)}"
                )
            if info.dtype not in WEIGHT_DTYPES:
                raise ModelError(
                    f"{info.file}: tensor {name} has dtype {info.dtype}; "
                    "supported: float32, float16, bfloat16"
                )

    def _weight_dtype(self) -> torch.dtype:
        counts: dict[torch.dtype, int] = {}
        for name in self.family.expected_tensors(self.spec):
            info = self.infos[name]
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
        return max(counts, key=counts.__getitem__)

    def _fingerprint(self) -> str:
        """config + names/shapes/dtypes + a content sample (first/last bytes of each shard)."""
        h = hashlib.sha256(json.dumps(self.raw_config, sort_keys=True).encode())
        for name in sorted(self.infos):
            i = self.infos[name]
            h.update(f"{name}|{i.shape}|{i.dtype}|{i.nbytes}".encode())
        for file in sorted({i.file for i in self.infos.values()}):
            size = os.path.getsize(file)
            with open(file, "rb") as f:
                h.update(f.read(65536))
                f.seek(max(0, size - 65536))
                h.update(f.read(65536))
        return h.hexdigest()[:32]

    # ---- access --------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        mf = self._files.get(info.file)
        if mf is None:
            mf = self._files[info.file] = MappedFile(info.file, self.writable)
        return mf.view(info)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    def outer(self) -> dict[str, torch.Tensor]:
        """Embeddings/positions/final norm/lm_head by full name (tied: lm_head absent)."""
        return {n: self.tensor(n) for n in self.family.outer_tensors(self.spec)}

    def block(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors by block-local name, as mmap views (no copy)."""
        prefix = self.family.layer_prefix(i)
        return {local: self.tensor(prefix + local) for local in self.family.block_tensors(self.spec)}

    def block_nbytes(self, i: int) -> int:
        prefix = self.family.layer_prefix(i)
        return sum(self.infos[prefix + n].nbytes for n in self.family.block_tensors(self.spec))

    def outer_nbytes(self) -> int:
        return sum(self.infos[n].nbytes for n in self.family.outer_tensors(self.spec))

    def num_parameters(self) -> int:
        names = self.family.expected_tensors(self.spec)
        return sum(math.prod(self.infos[n].shape) for n in names)


def _hf_config(model_dir: Path, raw: dict[str, Any]):
    from transformers import AutoConfig

    model_type = raw.get("model_type")
    if not model_type:
        raise ModelError(
            f"{model_dir / 'config.json'}: no model_type; is this a Hugging Face model directory?"
        )
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir / 'config.json'}: cannot read config ({exc})") from None
