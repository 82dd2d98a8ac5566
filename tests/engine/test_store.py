"""WeightStore against real safetensors directories: errors, shards, zero copy, read-only, fingerprint.

References are independent of the store: tensors come from `safetensors.torch.load_file`, byte
offsets from parsing the safetensors header by hand, parameter counts from the transformers model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny import build_hf_model
from zostream.engine.errors import ModelError
from zostream.engine.store import WeightStore

LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
Q1 = "model.layers.1.self_attn.q_proj.weight"


# ---- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pristine model dirs, built once per module; tests that mutate one copy it first (`clone`)."""
    root = tmp_path_factory.mktemp("models")
    llama = build_hf_model("llama")
    llama.save_pretrained(root / "llama")
    llama.save_pretrained(root / "llama_sharded", max_shard_size="20KB")
    return {"llama": root / "llama", "llama_sharded": root / "llama_sharded"}


def clone(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def header(path: Path) -> tuple[int, dict]:
    """(data start, tensor entries) parsed by hand from the safetensors format."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + hlen])
    entries.pop("__metadata__", None)
    return 8 + hlen, entries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_error(model_dir: Path, *fragments: str) -> str:
    """Open `model_dir`, expect ModelError, and check the message names every fragment.

    The directory's path is replaced by "<dir>" first: pytest's tmp path contains the test's name,
    which would otherwise satisfy fragments like "truncated" or "gpt2" on its own.
    """
    with pytest.raises(ModelError) as exc:
        WeightStore(model_dir)
    msg = str(exc.value).replace(str(model_dir), "<dir>")
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message: {msg}"
    return msg


def rewrite(path: Path, edit) -> None:
    """Rewrite one safetensors file after `edit(tensors)` mutates its dict of tensors."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ---- 1. bad model directories -------------------------------------------------------------------
def test_missing_directory(tmp_path):
    model_error(tmp_path / "nope", "<dir>", "does not exist")


def test_missing_config(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    (d / "config.json").unlink()
    model_error(d, "<dir>", "config.json")


def test_config_invalid_json(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    (d / "config.json").write_text('{"model_type": "llama",')
    model_error(d, "<dir>/config.json", "invalid JSON")


def test_config_without_model_type(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))
    model_error(d, "<dir>/config.json", "model_type")


def test_model_type_unknown_to_transformers(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    cfg = json.loads((d / "config.json").read_text()) | {"model_type": "no_such_arch"}
    (d / "config.json").write_text(json.dumps(cfg))
    model_error(d, "<dir>/config.json", "no_such_arch")


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import AutoConfig

    d = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=101).save_pretrained(d)
    model_error(d, "gpt2", "llama", "mistral", "qwen2", "qwen3", "opt")


def test_missing_shard_is_named(models, tmp_path):
    d = clone(models["llama_sharded"], tmp_path)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map[Q1]
    (d / shard).unlink()
    model_error(d, "missing shard", shard, Q1)


def test_index_invalid_json(models, tmp_path):
    d = clone(models["llama_sharded"], tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    model_error(d, "<dir>/model.safetensors.index.json", "invalid")


def test_tensor_in_index_but_not_in_its_shard(models, tmp_path):
    d = clone(models["llama_sharded"], tmp_path)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map[Q1]
    rewrite(d / shard, lambda t: t.pop(Q1))
    model_error(d, f"<dir>/{shard}", Q1, "index")


def test_missing_tensor_is_named(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.pop(Q1))
    model_error(d, "missing tensor", Q1)


def test_shape_disagreeing_with_config(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"  # config: 2 kv heads * 8 dims -> [16, 32]
    rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, t[name][:8].clone()))
    model_error(d, "<dir>/model.safetensors", name, "[8, 32]", "[16, 32]")


@pytest.mark.parametrize("keep", ["minus100", 0, 4, 20], ids=["tail", "empty", "in-length", "in-header"])
def test_truncated_file(models, tmp_path, keep):
    """A partial download: cut inside the data, inside the 8-byte length, or inside the JSON header."""
    d = clone(models["llama"], tmp_path)
    path = d / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100 if keep == "minus100" else keep)
    model_error(d, "<dir>/model.safetensors", "truncated")


def test_corrupt_header(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    path = d / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\xfe{["  # not UTF-8 JSON any more
    path.write_bytes(bytes(raw))
    model_error(d, "<dir>/model.safetensors", "corrupt")


def test_header_entry_without_offsets(models, tmp_path):
    """Valid JSON whose entry lacks data_offsets is a corrupt file, not a KeyError."""
    d = clone(models["llama"], tmp_path)
    path = d / "model.safetensors"
    start, entries = header(path)
    del entries[Q1]["data_offsets"]
    head = json.dumps(entries).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + path.read_bytes()[start:])
    model_error(d, "<dir>/model.safetensors", Q1)


def test_int8_linear_weight_is_refused(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.__setitem__(Q1, t[Q1].to(torch.int8)))
    model_error(d, "<dir>/model.safetensors", Q1, "int8")


def test_no_safetensors_files(models, tmp_path):
    d = tmp_path / "bin_only"
    d.mkdir()
    shutil.copy(models["llama"] / "config.json", d / "config.json")
    torch.save(load_file(models["llama"] / "model.safetensors"), d / "pytorch_model.bin")
    model_error(d, "<dir>", "safetensors")


# ---- 2. sharded checkpoints ---------------------------------------------------------------------
def test_sharded_equals_single_file(models):
    ref = load_file(models["llama"] / "model.safetensors")
    store = WeightStore(models["llama_sharded"])
    assert len({info.file for info in store.infos.values()}) > 1, "fixture should have several shards"
    assert set(store.infos) == set(ref)
    for name, want in ref.items():
        got = store.tensor(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    # The grouped accessors hand out the same tensors.
    for i in range(store.num_layers):
        for local, got in store.block(i).items():
            assert torch.equal(got, ref[f"model.layers.{i}.{local}"])
    assert all(torch.equal(t, ref[n]) for n, t in store.outer().items())


# ---- 3. zero copy -------------------------------------------------------------------------------
def mapping_of(ptr: int) -> str:
    """Path of the /proc/self/maps entry holding address `ptr` ("" for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) > 5 else ""
    return ""


@LINUX_PROC
def test_block_tensors_are_views_of_the_file_mapping(models):
    path = models["llama"] / "model.safetensors"
    start, entries = header(path)
    store = WeightStore(models["llama"])
    block = store.block(1)
    q, k = block["self_attn.q_proj.weight"], block["self_attn.k_proj.weight"]
    storage = q.untyped_storage()
    assert k.untyped_storage().data_ptr() == storage.data_ptr()  # one mapping per file
    assert storage.nbytes() == path.stat().st_size
    assert mapping_of(storage.data_ptr()) == str(path.resolve())
    for local, t in block.items():
        offset = start + entries[f"model.layers.1.{local}"]["data_offsets"][0]
        assert t.data_ptr() == storage.data_ptr() + offset, local


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rchar() -> int:
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])


@LINUX_PROC
def test_open_reads_headers_only_on_a_sparse_2gb_model(models, tmp_path):
    """A ~1.9 GB fp32 llama whose data is a hole: opening and mapping every block must not read it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {n: list(p.shape) for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    d = tmp_path / "big"
    cfg.save_pretrained(d)
    entries, pos = {}, 0
    for name, shape in shapes.items():
        n = 4 * torch.Size(shape).numel()
        entries[name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    head = json.dumps(entries).encode()
    head += b" " * (-len(head) % 8)
    path = d / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + pos)  # sparse: no disk blocks, reads as zeros
    assert path.stat().st_size > 1.8e9

    WeightStore(models["llama"])  # warm lazy imports so they are not counted below
    rss0, read0, t0 = _proc_status("VmRSS"), _rchar(), time.perf_counter()
    store = WeightStore(d)
    elapsed, read = time.perf_counter() - t0, _rchar() - read0
    # header + the fingerprint's 2 x 64 KiB sample + config.json, with slack for small reads.
    assert read < len(head) + 2 * 65536 + 2**20, f"opening read {read} bytes"
    assert elapsed < 1.0
    views = [store.block(i) for i in range(store.num_layers)] + [store.outer()]
    assert sum(t.numel() for v in views for t in v.values()) * 4 == pos
    assert _proc_status("VmRSS") - rss0 < 100 * 2**20


# ---- 4. the base file is never written ----------------------------------------------------------
_WRITE_THROUGH_A_VIEW = """
import sys
from zostream.engine.store import WeightStore
t = WeightStore(sys.argv[1]).block(0)["self_attn.q_proj.weight"]
print("mapped", flush=True)
t.add_(1)
print("written", flush=True)
"""


@LINUX_PROC
def test_a_write_through_a_view_faults_and_never_reaches_the_file(models, tmp_path):
    # The mapping is PROT_READ: the kernel refuses the store (SIGSEGV), so neither the file nor the
    # process's own view can change. Run in a child: the fault kills the process that writes.
    d = clone(models["llama"], tmp_path)
    path = d / "model.safetensors"
    before = sha256(path)
    ref = load_file(path)["model.layers.0.self_attn.q_proj.weight"].clone()
    proc = subprocess.run(
        [sys.executable, "-c", _WRITE_THROUGH_A_VIEW, str(d)], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.split() == ["mapped"], (proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]
    assert sha256(path) == before
    assert torch.equal(WeightStore(d).block(0)["self_attn.q_proj.weight"], ref)


@LINUX_PROC
def test_the_base_is_a_read_only_shared_mapping(models):
    # /proc/self/maps lists the file with "r--s" permissions: read-only, shared (not charged against
    # the commit limit as a private copy-on-write mapping is).
    store = WeightStore(models["llama"])
    t = store.block(0)["self_attn.q_proj.weight"]
    target = str((models["llama"] / "model.safetensors").resolve())
    perms = [
        line.split()[1] for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(target)
    ]
    assert perms and set(perms) == {"r--s"}, perms
    del t


# ---- 5. fingerprint -----------------------------------------------------------------------------
def test_fingerprint_stable_across_opens_and_copies(models, tmp_path):
    fp = WeightStore(models["llama"]).fingerprint
    assert WeightStore(models["llama"]).fingerprint == fp
    assert WeightStore(clone(models["llama"], tmp_path)).fingerprint == fp  # content, not path


def test_fingerprint_changes_with_one_weight(models, tmp_path):
    # The content sample covers only the first and last 64 KiB of each shard (so opening stays
    # O(headers)); a change in the middle of a large shard is NOT detected. The tiny file is ~140 KB,
    # so we change one element of the tensor whose bytes come first in the file.
    d = clone(models["llama"], tmp_path)
    path = d / "model.safetensors"
    fp = WeightStore(d).fingerprint
    start, entries = header(path)
    first = min(entries, key=lambda n: entries[n]["data_offsets"][0])
    at = start + entries[first]["data_offsets"][0]
    raw = bytearray(path.read_bytes())
    (x,) = struct.unpack("<f", raw[at : at + 4])
    raw[at : at + 4] = struct.pack("<f", x + 1.0)
    ref = {n: t.clone() for n, t in load_file(path).items()}  # load_file maps: copy before rewriting
    path.write_bytes(bytes(raw))
    new = load_file(path)
    changed = [n for n in ref if not torch.equal(ref[n], new[n])]
    assert changed == [first] and int((ref[first] != new[first]).sum()) == 1
    assert WeightStore(d).fingerprint != fp


def test_fingerprint_changes_with_config(models, tmp_path):
    d = clone(models["llama"], tmp_path)
    fp = WeightStore(d).fingerprint
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg["rms_norm_eps"] * 10
    (d / "config.json").write_text(json.dumps(cfg))
    assert WeightStore(d).fingerprint != fp


# ---- 6. sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "qwen3", "opt", "opt_proj"])
def test_parameter_count_and_byte_totals(tmp_path, name):
    model = build_hf_model(name, dtype=torch.bfloat16 if name == "qwen3" else torch.float32)
    model.save_pretrained(tmp_path / name)
    store = WeightStore(tmp_path / name)
    assert store.num_parameters() == sum(p.numel() for p in model.parameters())  # tied counted once
    _, entries = header(tmp_path / name / "model.safetensors")
    file_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
    total = store.outer_nbytes() + sum(store.block_nbytes(i) for i in range(store.num_layers))
    assert total == file_bytes
    assert store.dtype == next(model.parameters()).dtype
