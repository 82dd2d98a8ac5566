"""Transfer codecs for the frozen base: the packed form crosses PCIe, the device decodes it.

A codec turns one host tensor into a few plain tensors ("parts", safetensors-storable)
and back. Only 2-D linear weights inside blocks are encoded (`encodes`); norms and
biases travel raw. Per-tensor layout, for a weight of shape (*lead, C), n elements,
blocksize bs, nb = ceil(n / bs) blocks over the row-major flat order (bitsandbytes'):

    none  raw    : stored dtype, (*lead, C)             identity
    int8  q      : uint8, (*lead, C)                    index into the 256-entry dynamic map
          absmax : float32, (nb,)                       max |x| of each flat block
    nf4   q      : uint8, (*lead, C // 2)               flat byte k = elem 2k << 4 | elem 2k+1
          absmax : float32, (nb,)

Encoding runs once per model (on the GPU when there is one, in flat chunks of whole
blocks so peak memory is bounded) and is cached on disk by `codec_cache.CodecCache`, keyed
by the model fingerprint, codec and blocksize; later starts mmap the packed blocks.
Full-parameter training never goes through a lossy codec: tiny ZO updates would vanish.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from typing import Any, Protocol

import torch

from .config import CodecConfig

CHUNK_ELEMS = 1 << 26  # 64M elements per encode chunk: a multiple of every blocksize (<= 4096)
SEP = "::"  # packed block key: "<local name>::<part>"
FORMAT = 1  # bump when the on-disk layout changes: old caches are then rebuilt
_NOT_LINEAR = ("norm", "embed", "lm_head", "wte", "wpe")
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # part or packed key -> (shape, dtype)
Packed = dict[str, torch.Tensor]


def _bnb() -> Any:
    """bitsandbytes.functional, imported on first use (the "none" codec never needs it).

    Its CPU backend warns at import about an optional gemm kernel package we never use.
    """
    if "bitsandbytes.functional" not in sys.modules:
        log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            import bitsandbytes.functional  # noqa: F401
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"the int8 and nf4 codecs need bitsandbytes ({exc}); install it with "
                "pip install 'zostream[codecs]' (or pip install 'bitsandbytes>=0.45'), "
                "or use --codec none"
            ) from exc
        finally:
            log.setLevel(level)
    return sys.modules["bitsandbytes.functional"]


class Codec(Protocol):
    name: str
    lossy: bool

    def encode(self, t: torch.Tensor, device: torch.device | None = None) -> Packed: ...
    def decode(self, packed: Packed, device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...
    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> Layout: ...
    def packed_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int: ...
    def table_digest(self) -> str: ...


def layout_nbytes(layout: Layout) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


class NoneCodec:
    """Identity: the tensor crosses in its stored dtype and is cast on the device."""

    name = "none"
    lossy = False

    def encode(self, t: torch.Tensor, device: torch.device | None = None) -> Packed:
        return {"raw": t}

    def decode(self, packed: Packed, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return packed["raw"].to(device, dtype)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> Layout:
        return {"raw": (tuple(shape), dtype)}

    def packed_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return layout_nbytes(self.layout(shape, dtype))

    def table_digest(self) -> str:
        return ""


class _BlockwiseCodec:
    """Shared chunked encode for the bitsandbytes blockwise codecs (absmax per flat block)."""

    name = ""
    lossy = True
    elems_per_byte = 1

    def __init__(self, blocksize: int = 64, chunk_elems: int = CHUNK_ELEMS) -> None:
        if chunk_elems % (2 * blocksize):
            raise ValueError(f"chunk_elems ({chunk_elems}) must be a multiple of 2 * blocksize ({blocksize})")
        self.blocksize = blocksize
        self.chunk_elems = chunk_elems
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table_host(self) -> torch.Tensor:
        raise NotImplementedError

    def table(self, device: torch.device) -> torch.Tensor:
        """The quantisation code (float32 lookup table), cached per device."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self._table_host().to(device)
        return self._tables[device]

    def table_digest(self) -> str:
        """Identifies the code table: a cache built with another table must not be decoded with this one."""
        raw = self._table_host().to(torch.float32).contiguous().numpy().tobytes()
        return hashlib.sha256(raw).hexdigest()[:16]

    def _quantize(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat chunk (m,) -> (q bytes (m / elems_per_byte,), absmax (ceil(m / bs),))."""
        raise NotImplementedError

    def _check(self, t: torch.Tensor) -> None:
        if t.dim() < 1 or t.numel() == 0:
            raise ValueError(
                f"{self.name} codec needs a non-empty tensor with >= 1 dim, got {tuple(t.shape)}"
            )
        if t.shape[-1] % self.elems_per_byte:
            raise ValueError(f"{self.name} codec needs an even last dim, got {tuple(t.shape)}; pass it raw")

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> Layout:
        *lead, c = shape
        nb = -(-math.prod(shape) // self.blocksize)
        return {"q": ((*lead, c // self.elems_per_byte), torch.uint8), "absmax": ((nb,), torch.float32)}

    def packed_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return layout_nbytes(self.layout(shape, dtype))

    def encode(self, t: torch.Tensor, device: torch.device | None = None) -> Packed:
        """Quantise chunk by chunk into preallocated host parts; chunk bounds fall on block bounds,
        so the result is the same as quantising the whole tensor at once."""
        self._check(t)
        lay = self.layout(tuple(t.shape), t.dtype)
        q = torch.empty(math.prod(lay["q"][0]), dtype=torch.uint8)
        absmax = torch.empty(lay["absmax"][0], dtype=torch.float32)
        flat = t.reshape(-1)
        bs, per = self.blocksize, self.elems_per_byte
        for s in range(0, flat.numel(), self.chunk_elems):
            chunk = flat[s : s + self.chunk_elems]
            if device is not None:
                chunk = chunk.to(device)
            cq, ca = self._quantize(chunk.contiguous())
            q[s // per : s // per + cq.numel()] = cq.reshape(-1).cpu()
            absmax[s // bs : s // bs + ca.numel()] = ca.reshape(-1).cpu()
        return {"q": q.view(lay["q"][0]), "absmax": absmax}


class Int8Codec(_BlockwiseCodec):
    """bitsandbytes blockwise dynamic 8-bit (signed dynamic map, one absmax per block)."""

    name = "int8"

    def _table_host(self) -> torch.Tensor:
        return _bnb().create_dynamic_map(signed=True)

    def _quantize(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, state = _bnb().quantize_blockwise(chunk, code=self.table(chunk.device), blocksize=self.blocksize)
        return q, state.absmax

    def decode(self, packed: Packed, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        F = _bnb()
        q = packed["q"]
        code = self.table(q.device)
        state = F.QuantState(absmax=packed["absmax"], code=code, blocksize=self.blocksize, dtype=dtype)
        return F.dequantize_blockwise(q, state)  # (*lead, C) in dtype: flat, shape-preserving kernels


class NF4Codec(_BlockwiseCodec):
    """bitsandbytes NF4 (QLoRA normal-float 4-bit), two values per byte, no double quantisation."""

    name = "nf4"
    elems_per_byte = 2

    def _table_host(self) -> torch.Tensor:
        return _bnb().get_4bit_type("nf4", device="cpu")

    def _quantize(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # compress_statistics=False: no double quantisation, absmax stays float32.
        q, state = _bnb().quantize_4bit(chunk, blocksize=self.blocksize, quant_type="nf4")
        return q, state.absmax

    def decode(self, packed: Packed, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        F = _bnb()
        q = packed["q"]
        shape = (*q.shape[:-1], q.shape[-1] * 2)
        n, bs = math.prod(shape), self.blocksize
        # bnb 0.50's CPU kernel puts blocks along rows (wrong when C % bs != 0); the CUDA one is flat.
        # Asking for rows of exactly one block (or one flat row) is right on both; the view restores shape.
        kshape = torch.Size((n // bs, bs) if n % bs == 0 else (1, n))
        state = F.QuantState(
            absmax=packed["absmax"], shape=kshape, dtype=dtype, blocksize=bs, quant_type="nf4"
        )
        # q as [(n / 2), 1] (bnb's own storage form) keeps dequantize_4bit's transposing shim off.
        return F.dequantize_4bit(q.reshape(-1, 1), state).reshape(shape)


def get_codec(cfg: CodecConfig) -> Codec:
    if cfg.name == "none":
        return NoneCodec()
    return {"int8": Int8Codec, "nf4": NF4Codec}[cfg.name](cfg.blocksize)


def encodes(local_name: str, shape: tuple[int, ...]) -> bool:
    """True for a linear weight inside a block: 2-D '.weight' that is no norm/embedding, even last dim."""
    module, _, leaf = local_name.rpartition(".")
    last = module.rpartition(".")[2].lower()
    return (
        leaf == "weight"
        and len(shape) == 2
        and shape[-1] % 2 == 0
        and not any(tag in last for tag in _NOT_LINEAR)
        and not last.startswith("ln")
    )


def block_layout(codec: Codec, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Layout:
    """Packed keys of one block -> (shape, dtype), from the dense shapes/dtypes alone (no data)."""
    out: Layout = {}
    for local, (shape, dtype) in tensors.items():
        parts = codec.layout(shape, dtype) if encodes(local, shape) else {"raw": (tuple(shape), dtype)}
        out |= {f"{local}{SEP}{part}": v for part, v in parts.items()}
    return out


def encode_block(
    codec: Codec, block: dict[str, torch.Tensor], device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Block-local name -> tensor  ==>  "name::part" -> host tensor (unencoded: "name::raw")."""
    out: dict[str, torch.Tensor] = {}
    dev = torch.device(device) if device is not None else None
    for local, t in block.items():
        if not encodes(local, tuple(t.shape)):
            out[f"{local}{SEP}raw"] = t
            continue
        out |= {f"{local}{SEP}{part}": p.cpu() for part, p in codec.encode(t, device=dev).items()}
    return out


def decode_block(
    codec: Codec, packed: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Inverse of encode_block, with the parts already on `device`: local name -> dense `dtype` tensor."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in packed.items():
        local, _, part = key.rpartition(SEP)
        groups.setdefault(local, {})[part] = t
    device = torch.device(device)
    return {
        local: parts["raw"].to(device, dtype) if set(parts) == {"raw"} else codec.decode(parts, device, dtype)
        for local, parts in groups.items()
    }
