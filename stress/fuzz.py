"""Property-based fuzzer (hypothesis) of every RPC: random and boundary messages, sent as raw bytes so
they can also be invalid protobuf or invalid UTF-8.

    python -m stress.fuzz --requests 10000 --seed 0 --json-out fuzz.json

The server runs in this process (a thread, on a loopback port, tiny model, fresh data dir) so that a
Python audit hook can see every file it opens, creates, renames or deletes. Inputs: huge strings,
negative / NaN / infinite / out-of-range numbers, unknown enum values, wrong and foreign ids, path
traversal in names, invalid UTF-8, corrupt wire format, oversized uploads (the dataset and update-log
limits are lowered to 64 KiB here so oversized uploads are cheap; the check is the same code).

Properties, per request: the status is one the RPC documents (never INTERNAL or UNKNOWN, never a
deadline except on StreamJobEvents of a running job); an error has a message and names no server path;
a finished Generate has a final message whose usage matches the tokens sent. At the end: the server is
SERVING, the engine thread alive, greedy output unchanged, and no file outside the data dir was written
(nor any read outside the data dir, the model and the Python installation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

from stress.common import ROOT, markdown_table, report, tiny_model
from tests.server.conftest import engine_config, server_config, thread_server
from zostream.v1 import adapters_pb2, finetuning_pb2, generation_pb2

OK, INV, NF, FP, RE, AE, DE = (
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "ALREADY_EXISTS",
    "DEADLINE_EXCEEDED",
)
# The statuses each RPC documents (proto comments + the AIP conventions of common.proto). INVALID_ARGUMENT
# is allowed everywhere: any request can be corrupt protobuf.
ALLOWED: dict[str, set[str]] = {
    "Generate": {OK, INV, NF, FP, RE, AE},
    "Abort": {OK, INV},
    "Tokenize": {OK, INV, FP},
    "GetModelInfo": {OK, INV},
    "CreateJob": {OK, INV, NF, FP, AE},
    "UploadDataset": {OK, INV, AE, RE},
    "ListDatasets": {OK, INV},
    "GetJob": {OK, INV, NF},
    "ListJobs": {OK, INV},
    "CancelJob": {OK, INV, NF, FP},
    "ListJobEvents": {OK, INV, NF},
    "StreamJobEvents": {OK, INV, NF, DE},  # DE: the stream follows a job that is still running
    "ListCheckpoints": {OK, INV, NF},
    "ListAdapters": {OK, INV},
    "GetAdapter": {OK, INV, NF},
    "DeleteAdapter": {OK, INV, NF, FP},
    "ExportUpdateLog": {OK, INV, NF},
    "ImportUpdateLog": {OK, INV, AE, FP, RE},
    "DownloadWeights": {OK, INV, NF, FP},
    "ImportPeftAdapter": {OK, INV, AE, FP, RE},
    "GetDataset": {OK, INV, NF},
    "DeleteDataset": {OK, INV, NF, FP},
    "DeleteJob": {OK, INV, NF, FP},
    "Check": {OK, INV, NF},
}
SERVICES = [
    generation_pb2.DESCRIPTOR.services_by_name["TextGeneration"],
    finetuning_pb2.DESCRIPTOR.services_by_name["FineTuning"],
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
]
# Health.Watch never ends; Health.List is not implemented by grpcio-health-checking (UNIMPLEMENTED).
METHODS = {m.name: m for s in SERVICES for m in s.methods if m.name not in ("Watch", "List")}
LIMIT = 64 * 1024  # dataset and update-log upload limit during the fuzz run
TIMEOUT = 30.0

HOSTILE = [
    "",
    ".",
    "..",
    "../",
    "../../etc/passwd",
    "/etc/passwd",
    "/",
    "a/b",
    "a\\b",
    "a\x00b",
    "a\nb",
    "name\n",
    " x",
    "x" * 100,
    "x" * 101,
    "x" * 5000,
    "ünïcödé",
    "\u202e\u0000",
    "%2e%2e%2f",
    "~root",
    "job-",
    "job-000000000000",
    "datasets",
    "jobs",
    "adapters",
    "imported-1",
    "-x",
    ".hidden",
    "x..y",
    "NUL",
    "😀",
]
HUGE = ["7 " * 300_000, "x" * 1_000_001, "\u00e9" * 400_000]
DOUBLES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-300,
    1e300,
    math.nan,
    math.inf,
    -math.inf,
    100.0,
    100.00001,
    1e-7,
    2.0,
]
UINT = [
    0,
    1,
    2,
    3,
    4,
    8,
    16,
    64,
    100,
    101,
    500,
    501,
    511,
    512,
    4096,
    4097,
    10**6,
    10**7,
    2**31 - 1,
    2**32 - 1,
]
INT64 = [0, 1, -1, 2**63 - 1, -(2**63), 2**31, -(2**31)]
UINT64 = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]


class Known:
    """Ids that exist on the server (drawn at run time, so the fuzzer also hits real objects)."""

    def __init__(self) -> None:
        self.datasets: list[str] = []
        self.jobs: list[str] = []
        self.adapters: list[str] = []
        self.request_ids: list[str] = ["fuzz-fixed-id"]
        self.log: bytes = b""
        self.dataset: bytes = b""

    def pick(self, kind: str) -> st.SearchStrategy[str]:
        return st.integers(0, 10**6).map(
            lambda i: (getattr(self, kind) or ["none"])[i % len(getattr(self, kind) or ["none"])]
        )


def ids(known: Known, kind: str) -> st.SearchStrategy[str]:
    near = known.pick(kind).map(lambda s: s[:-1] + ("0" if not s.endswith("0") else "1"))
    return st.one_of(known.pick(kind), near, st.sampled_from(HOSTILE), st.text(max_size=40))


def prompts() -> st.SearchStrategy[str]:
    numbers = st.lists(st.integers(1, 98), min_size=1, max_size=40).map(lambda xs: " ".join(map(str, xs)))
    return st.one_of(numbers, numbers, st.text(max_size=60), st.sampled_from(HOSTILE), st.sampled_from(HUGE))


def dataset_chunks(known: Known) -> st.SearchStrategy[bytes]:
    lines = st.lists(st.fixed_dictionaries({"text": prompts().filter(lambda s: len(s) < 1000)}), max_size=5)
    valid = lines.map(lambda xs: "\n".join(json.dumps(x) for x in xs).encode())
    other = st.sampled_from(
        [
            b'{"text": oops}',
            b"\xff\xfe\xfd",
            b"[" * 50_000,
            b'{"prompt": "1 2", "completion": 3}',
            b'{"prompt": "1", "completion": " 2"}\n{"text": "3"}',
            b"\n\n\n",
            b'"just a string"',
            b"null",
            b'{"text": ""}',
            b"x" * (LIMIT + 1),
            b'{"text": "\\ud800"}',
            b'{"choices": [1], "label": 5}',
            b'{"text": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
            b'{"text": 1' + b"0" * 5000 + b"}",
            b'{"text": "1 \\udc80 2"}',
            b'{"prompt": "1", "completion": "2", "x": ' + b"{" * 5000 + b"}" * 5000 + b"}",
        ]
    )
    return st.one_of(valid, valid, other, st.binary(max_size=300), st.just(0).map(lambda _: known.dataset))


def log_chunks(known: Known) -> st.SearchStrategy[bytes]:
    def cut(i: int) -> bytes:
        return known.log[: i % (len(known.log) + 1)]

    def flip(i: int) -> bytes:
        b = bytearray(known.log or b"\0")
        b[i % len(b)] ^= 1 << (i % 8)
        return bytes(b)

    return st.one_of(
        st.just(0).map(lambda _: known.log),
        st.integers(0, 10**6).map(cut),
        st.integers(0, 10**6).map(flip),
        st.binary(max_size=200),
        st.sampled_from([b"ZOLOG\0\x01\x00\xff\xff\xff\xff", b"\0" * (LIMIT + 1)]),
        st.sampled_from(CRAFTED_LOGS),
    )


def crafted_header(js: bytes, version: int = 1) -> bytes:
    """An update-log header with a valid CRC around any JSON: only the parser stands between it and harm."""
    return b"ZOLOG\0" + struct.pack("<HI", version, len(js)) + js + struct.pack("<I", zlib.crc32(js))


_HEADER = {
    "base_fingerprint": "x",
    "scope": {"kind": "lora", "r": 10**9, "alpha": 1e308, "targets": ["q_proj"], "init_seed": -1},
    "noise": "gaussian",
    "generator_version": 1,
    "master_dtype": "float32",
    "rounding": "nearest",
    "eps": 1e-3,
    "weight_decay": 0.0,
    "decay_exclusions": [],
    "job_seed": 0,
    "q": 1,
    "extra": {},
}
CRAFTED_LOGS = [
    crafted_header(b"[" * 50_000 + b"]" * 50_000),
    crafted_header(b'{"base_fingerprint": 1' + b"0" * 5000 + b"}"),
    crafted_header(b'{"base_fingerprint": "\\ud800"}'),
    crafted_header(b"\xff\xfe"),
    crafted_header(b"{}", version=2),
    crafted_header(b"null"),
    crafted_header(json.dumps(_HEADER).encode()),
]


def scalar(f: Any, known: Known) -> st.SearchStrategy[Any]:
    """A field's values: boundaries first, then anything its type holds; names pick hostile ids."""
    n = f.name
    if f.type == FD.TYPE_STRING:
        if n in ("job_id",):
            return ids(known, "jobs")
        if n in ("adapter_id",):
            return st.one_of(ids(known, "adapters"), ids(known, "jobs"))
        if n in ("training_dataset", "validation_dataset", "name"):
            return ids(known, "datasets")
        if n in ("request_id", "request_ids"):
            return st.one_of(known.pick("request_ids"), st.sampled_from(HOSTILE), st.text(max_size=20))
        if n in ("text", "content"):
            return prompts()
        if n == "role":
            return st.sampled_from(["user", "system", "assistant", "tool", "", "wizard", "x" * 1000])
        if n == "target_modules":
            return st.sampled_from(
                ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "lm_head", "", "../x"]
            )
        if n in ("codec", "master_dtype", "kind"):
            return st.sampled_from(["", "none", "nf4", "int8", "float32", "bfloat16", "text", "choice", "x"])
        if n == "page_token":
            return st.sampled_from(["", "0", "1", "2", "-1", "999999", "x", "1e3", " 1", "9" * 30])
        return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=30))
    if f.type == FD.TYPE_BYTES:
        return st.binary(max_size=100)
    if f.type == FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(DOUBLES), st.floats(allow_nan=True, allow_infinity=True))
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type == FD.TYPE_ENUM:
        values = [v.number for v in f.enum_type.values]
        return st.sampled_from([*values, *values, 99, -1, 2**31 - 1, -(2**31)])
    if f.type == FD.TYPE_UINT32:
        return st.one_of(st.sampled_from(UINT), st.integers(0, 2**32 - 1))
    if f.type == FD.TYPE_UINT64:
        return st.one_of(st.sampled_from(UINT64), st.integers(0, 2**64 - 1))
    if f.type == FD.TYPE_INT64:
        return st.one_of(st.sampled_from(INT64), st.integers(-(2**63), 2**63 - 1))
    if f.type == FD.TYPE_INT32:
        return st.integers(-(2**31), 2**31 - 1)
    raise NotImplementedError(f"field type {f.type} of {f.full_name}")


def messages(desc: Any, known: Known, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `desc` with a random subset of fields set (oneofs: the last one set wins)."""
    cls = message_factory.GetMessageClass(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.type == FD.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = messages(f.message_type, known, depth + 1)
        elif f.name == "ids":  # token ids: around the vocabulary size, sometimes many
            value = st.one_of(
                st.sampled_from([0, 1, 98, 99, 100, 101, 102, 2**31, 2**32 - 1]), st.integers(0, 120)
            )
        else:
            value = scalar(f, known)
        if f.is_repeated:
            big = (
                st.lists(value, min_size=1000, max_size=5000)
                if f.name in ("ids", "request_ids")
                else st.nothing()
            )
            value = st.one_of(st.lists(value, max_size=4), st.lists(value, max_size=4), big)
        fields[f.name] = value

    def build(values: dict[str, Any]) -> Any:
        msg = cls()
        for name, v in values.items():
            try:
                if isinstance(v, list):
                    field = getattr(msg, name)
                    if v and hasattr(v[0], "SerializeToString"):
                        for x in v:
                            field.add().CopyFrom(x)
                    else:
                        field.extend(v)
                elif hasattr(v, "SerializeToString"):
                    getattr(msg, name).CopyFrom(v)
                else:
                    setattr(msg, name, v)
            except (ValueError, TypeError):
                pass  # out of the wire type's range: what a client library refuses to send
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


def serialize(msg: Any) -> bytes:
    try:
        return msg.SerializeToString()
    except Exception:  # noqa: BLE001 - lone surrogates in a str: send the field without it
        return type(msg)().SerializeToString()


def mutate(data: bytes, how: int, pos: int) -> bytes:
    """Corrupt wire bytes: flip a byte, cut, append an invalid-UTF-8 string field, or garbage."""
    if how == 0 and data:
        b = bytearray(data)
        b[pos % len(b)] ^= 0xFF
        return bytes(b)
    if how == 1:
        return data[: pos % (len(data) + 1)]
    if how == 2:
        field = 1 + pos % 8
        return data + bytes([(field << 3) | 2, 3]) + b"\xff\xc0\xfe"
    if how == 3:
        return bytes([pos % 256]) * (1 + pos % 40)
    return data


def wire(desc: Any, known: Known) -> st.SearchStrategy[bytes]:
    """Serialized messages, one in six corrupted."""
    mutated = st.tuples(messages(desc, known), st.integers(0, 3), st.integers(0, 10**6)).map(
        lambda t: mutate(serialize(t[0]), t[1], t[2])
    )
    valid = messages(desc, known).map(serialize)
    return st.one_of(valid, valid, valid, valid, valid, mutated)


def upload_parts(method: Any, known: Known) -> st.SearchStrategy[list[bytes]]:
    cls = message_factory.GetMessageClass(method.input_type)
    meta_desc = method.input_type.fields_by_name["metadata"].message_type
    chunks = dataset_chunks(known) if method.name == "UploadDataset" else log_chunks(known)

    def meta(m: Any) -> bytes:
        return serialize(cls(metadata=m))

    def chunk(b: bytes) -> bytes:
        if "file" in method.input_type.fields_by_name:  # ImportPeftAdapter: FileChunk parts
            name = "adapter_config.json" if len(b) % 2 else "adapter_model.safetensors"
            return serialize(cls(file=adapters_pb2.FileChunk(path=name, chunk=b)))
        return serialize(cls(chunk=b))

    first = st.one_of(
        messages(meta_desc, known).map(meta), messages(meta_desc, known).map(meta), chunks.map(chunk)
    )
    rest = st.lists(
        st.one_of(chunks.map(chunk), chunks.map(chunk), messages(meta_desc, known).map(meta)), max_size=3
    )
    whole = st.tuples(first, rest).map(lambda t: [t[0], *t[1]])
    corrupt = st.tuples(whole, st.integers(0, 3), st.integers(0, 10**6)).map(
        lambda t: [*t[0][:-1], mutate(t[0][-1], t[1], t[2])]
    )
    return st.one_of(whole, whole, whole, corrupt, st.just([]))


def nearly_valid(known: Known) -> dict[str, st.SearchStrategy[Any]]:
    """Requests that mostly pass validation, so the fuzzer reaches the engine, jobs, uploads and imports."""
    G, F = generation_pb2, finetuning_pb2
    from zostream.v1 import common_pb2 as Cm

    words = st.lists(st.integers(1, 98), min_size=1, max_size=40).map(lambda xs: " ".join(map(str, xs)))
    sampling = st.builds(
        lambda t, k, p, r, seed: G.SamplingParams(
            temperature=t, top_k=k, top_p=p, repetition_penalty=r, seed=seed
        ),
        st.sampled_from([0.0, 0.5, 1.0, 2.0]),
        st.sampled_from([0, 1, 5, 1000]),
        st.sampled_from([0.1, 0.9, 1.0]),
        st.sampled_from([1.0, 1.2]),
        st.integers(0, 2**63 - 1),
    )
    stopping = st.builds(
        lambda n, ign, stop, tl: G.StoppingCriteria(
            max_new_tokens=n, ignore_eos=ign, stop=stop, time_limit_seconds=tl
        ),
        st.sampled_from([1, 2, 4, 8, 16, 32, 64, 500]),
        st.booleans(),
        st.lists(st.sampled_from(["5", "9 9", "x"]), max_size=2),
        st.sampled_from([0.0, 0.0, 0.01, 1.0]),
    )
    rid = st.one_of(st.just(""), st.text("abc123", min_size=1, max_size=8), known.pick("request_ids"))
    adapter = st.one_of(st.just(""), st.just(""), known.pick("adapters"), known.pick("jobs"))
    generate = st.builds(
        lambda text, s, stop, r, a, stream: G.GenerateRequest(
            text=text, sampling=s, stopping=stop, request_id=r, adapter_id=a, stream=stream
        ),
        words,
        sampling,
        stopping,
        rid,
        adapter,
        st.booleans(),
    )
    name = st.text("abcdefgh0123456789-_.", min_size=1, max_size=12).filter(lambda s: s[0].isalnum())
    hp = st.builds(
        lambda steps, b, q, r, t, lr, mdtype, sched: F.Hyperparameters(
            steps=steps,
            batch_size=b,
            q=q,
            learning_rate=lr,
            lr_schedule=sched,
            master_dtype=mdtype,
            max_len=32,
            lora=Cm.LoraConfig(r=r, target_modules=t),
        ),
        st.integers(1, 5),
        st.integers(0, 8),
        st.integers(0, 3),
        st.integers(0, 8),
        st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "embed"]), max_size=3),
        st.sampled_from([1e-3, 0.1, 1e3, 1e-9]),
        st.sampled_from(["", "float32", "bfloat16", "float16", "fp8"]),
        st.sampled_from([0, 1, 2, 3]),
    )
    create = st.builds(
        lambda m, d, h, key: F.CreateJobRequest(
            method=m, training_dataset=d, hyperparameters=h, idempotency_key=key
        ),
        st.sampled_from([Cm.TUNING_METHOD_LORA, Cm.TUNING_METHOD_FULL]),
        known.pick("datasets"),
        hp,
        st.sampled_from(["", "", "k1", "k2"]),
    )
    valid_lines = st.lists(words, min_size=1, max_size=6).map(
        lambda xs: "\n".join(json.dumps({"text": x}) for x in xs)
    )
    data = st.one_of(valid_lines.map(str.encode), valid_lines.map(str.encode), dataset_chunks(known))
    upload = st.builds(
        lambda n, ow, data: [
            F.UploadDatasetRequest(metadata=F.DatasetMetadata(name=n, overwrite=ow)).SerializeToString(),
            F.UploadDatasetRequest(chunk=data).SerializeToString(),
        ],
        name,
        st.booleans(),
        data,
    )
    imp = st.builds(
        lambda n, data: [
            adapters_pb2.ImportUpdateLogRequest(
                metadata=adapters_pb2.ImportUpdateLogMetadata(adapter_id=n)
            ).SerializeToString(),
            adapters_pb2.ImportUpdateLogRequest(chunk=data).SerializeToString(),
        ],
        st.one_of(name, known.pick("adapters")),
        st.one_of(st.just(0).map(lambda _: known.log), log_chunks(known)),
    )
    return {
        "Generate": generate.map(serialize),
        "CreateJob": create.map(serialize),
        "UploadDataset": upload,
        "ImportUpdateLog": imp,
        "DeleteAdapter": known.pick("adapters").map(
            lambda a: adapters_pb2.DeleteAdapterRequest(adapter_id=a).SerializeToString()
        ),
        "ExportUpdateLog": known.pick("jobs").map(
            lambda j: adapters_pb2.ExportUpdateLogRequest(job_id=j).SerializeToString()
        ),
        "Abort": known.pick("request_ids").map(lambda r: G.AbortRequest(request_ids=[r]).SerializeToString()),
    }


class Audit:
    """Every file the server's threads open, create, rename or delete while `active` (a sys.audit hook)."""

    EVENTS = {
        "open",
        "os.remove",
        "os.rename",
        "os.replace",
        "os.mkdir",
        "os.rmdir",
        "shutil.rmtree",
        "os.truncate",
        "os.chmod",
        "os.symlink",
        "os.link",
        "os.unlink",
        "shutil.copyfile",
    }

    def __init__(self) -> None:
        self.active = False
        self.main = threading.get_ident()
        self.writes: list[tuple[str, str]] = []
        self.reads: list[tuple[str, str]] = []
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple) -> None:
        if not self.active or event not in self.EVENTS or threading.get_ident() == self.main:
            return
        write = event != "open"
        if event == "open":
            mode, flags = (args[1] if len(args) > 1 else "r"), (args[2] if len(args) > 2 else 0)
            write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            )
        if event == "shutil.copyfile":  # (src, dst): a read and a write
            self.reads.append((event, os.path.abspath(os.fspath(args[0]))))
            args, event = (args[1],), "copy to"
        # (path, ..., dir_fd) events: os.remove/rmdir/mkdir (dir_fd last), os.rename/replace (src, dst, fds)
        paths = (
            [(args[0], args[2]), (args[1], args[3])]
            if event in ("os.rename", "os.replace")
            else [
                (
                    args[0] if args else None,
                    args[-1]
                    if event in ("os.remove", "os.rmdir", "os.mkdir", "os.unlink", "shutil.rmtree")
                    else None,
                )
            ]
        )
        for path, dir_fd in paths:
            if isinstance(path, bytes):
                path = path.decode(errors="replace")
            if not isinstance(path, str | os.PathLike):
                continue
            path = os.fspath(path)
            if isinstance(dir_fd, int) and not os.path.isabs(path):  # fd-relative (shutil.rmtree does this)
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            (self.writes if write else self.reads).append((event, os.path.abspath(path)))

    def outside(self, data_dir: Path, model_dir: Path) -> dict[str, list[str]]:
        def under(p: str, roots: list[str]) -> bool:
            return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

        data, model = os.path.realpath(data_dir), os.path.realpath(model_dir)
        readable = [
            data,
            model,
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            str(ROOT),
            "/proc",
            "/sys",
            "/dev",
        ]
        readable += [p for p in sys.path if p and os.path.isdir(p)]
        return {
            "writes": sorted({f"{e} {p}" for e, p in self.writes if not under(os.path.realpath(p), [data])}),
            "reads": sorted({f"{e} {p}" for e, p in self.reads if not under(os.path.realpath(p), readable)}),
        }


def code_of(exc: grpc.RpcError) -> str:
    return exc.code().name


def server_paths(text: str, data_dir: Path, model_dir: Path) -> bool:
    return any(
        str(p) in text for p in (data_dir, model_dir, os.path.realpath(data_dir), tempfile.gettempdir())
    )


class Fuzzer:
    def __init__(self, channel: grpc.Channel, known: Known, data_dir: Path, model_dir: Path) -> None:
        self.channel, self.known = channel, known
        self.data_dir, self.model_dir = data_dir, model_dir
        self.counts: Counter[str] = Counter()  # "Method CODE"
        self.failures: list[str] = []
        self.requests = 0
        self.latencies: list[float] = []
        self.seconds: Counter[str] = Counter()  # wall seconds spent per RPC

    def call(self, name: str, payload: bytes | list[bytes]) -> tuple[str, list[Any] | Any]:
        m = METHODS[name]
        svc = m.containing_service.full_name
        path = f"/{svc}/{name}"
        out = message_factory.GetMessageClass(m.output_type).FromString
        ident = lambda b: b  # noqa: E731 - payloads are already wire bytes
        timeout = 2.0 if name == "StreamJobEvents" else TIMEOUT
        t0 = time.perf_counter()
        try:
            if m.client_streaming:
                resp = self.channel.stream_unary(path, ident, out)(iter(payload), timeout=timeout)
            elif m.server_streaming:
                resp = list(self.channel.unary_stream(path, ident, out)(payload, timeout=timeout))
            else:
                resp = self.channel.unary_unary(path, ident, out)(payload, timeout=timeout)
            code, detail = OK, ""
        except grpc.RpcError as exc:
            code, detail, resp = code_of(exc), exc.details() or "", None
        self.latencies.append(time.perf_counter() - t0)
        self.seconds[name] += self.latencies[-1]
        self.requests += 1
        self.counts[f"{name} {code}"] += 1
        problem = ""
        if code not in ALLOWED[name]:
            problem = f"{name}: status {code} is not documented for it ({detail[:200]!r})"
        elif code != OK and not detail and name != "Check":  # grpcio-health-checking: NOT_FOUND, no text
            problem = f"{name}: {code} without a message"
        elif code != OK and server_paths(detail, self.data_dir, self.model_dir):
            problem = f"{name}: the message names a server path: {detail[:200]!r}"
        elif code == OK and name == "Generate":
            problem = self.check_generate(payload, resp)  # type: ignore[arg-type]
        if problem:
            self.failures.append(problem)
        return code, resp

    def check_generate(self, payload: bytes, resp: list[Any]) -> str:
        if not resp or not resp[-1].finish_reason or any(r.finish_reason for r in resp[:-1]):
            return "Generate: OK without exactly one final message at the end"
        req = generation_pb2.GenerateRequest.FromString(payload)
        n = sum(len(r.token_ids) for r in resp)
        if resp[-1].usage.completion_tokens != n:
            return f"Generate: usage says {resp[-1].usage.completion_tokens} tokens, {n} arrived"
        if not req.stream and len(resp) != 1:
            return f"Generate: stream=false answered with {len(resp)} messages"
        return ""

    def after(self, name: str, code: str, resp: Any) -> None:
        """Remember what now exists; cancel created jobs at once (the fuzzer must stay bounded)."""
        if code != OK:
            return
        if name == "UploadDataset":
            self.known.datasets.append(resp.name)
        elif name == "CreateJob":
            self.known.jobs.append(resp.id)
            self.call("CancelJob", finetuning_pb2.CancelJobRequest(job_id=resp.id).SerializeToString())
        elif name == "ImportUpdateLog":
            self.known.adapters.append(resp.id)

    def strategy(self) -> st.SearchStrategy[tuple[str, Any]]:
        """Every RPC with generic messages, plus nearly valid ones for the RPCs with deep paths."""
        options = []
        for name, m in METHODS.items():
            if m.client_streaming:
                options.append(upload_parts(m, self.known).map(lambda p, n=name: (n, p)))
            else:
                options.append(wire(m.input_type, self.known).map(lambda p, n=name: (n, p)))
        for name, strat in nearly_valid(self.known).items():
            options += [strat.map(lambda p, n=name: (n, p))] * 2
        return st.one_of(*options)

    def sweep(self) -> None:
        """Every RPC once with an empty request (no fields set; no parts for a client stream), so every RPC
        is exercised whatever the generation below draws: its draws depend on what the server has
        answered so far (ids it returned), so which RPCs a short run reaches varies with timing."""
        for name, m in METHODS.items():
            self.call(name, [] if m.client_streaming else b"")

    def run(self, n: int, seed: int) -> None:
        @hyp_seed(seed)
        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(self.strategy())
        def one(case: tuple[str, Any]) -> None:
            name, payload = case
            code, resp = self.call(name, payload)
            self.after(name, code, resp)

        one()


def setup(stubs: Any, known: Known) -> list[int]:
    """A dataset, a finished LoRA job (its adapter and update log), and the greedy reference tokens."""
    F = finetuning_pb2
    known.dataset = "\n".join(
        json.dumps({"text": f"{i} {i + 1} {i + 2} {i + 3}"}) for i in range(1, 40)
    ).encode()
    stubs.ft.UploadDataset(
        iter(
            [
                F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="good")),
                F.UploadDatasetRequest(chunk=known.dataset),
            ]
        ),
        timeout=30,
    )
    known.datasets.append("good")
    from zostream.v1 import common_pb2 as Cm

    hp = F.Hyperparameters(
        steps=3,
        learning_rate=0.1,
        eps=0.05,
        batch_size=2,
        seed=1,
        max_len=32,
        lora=Cm.LoraConfig(r=2, alpha=4.0, target_modules=["q_proj"]),
    )
    job = stubs.ft.CreateJob(
        F.CreateJobRequest(method=Cm.TUNING_METHOD_LORA, training_dataset="good", hyperparameters=hp),
        timeout=30,
    )
    events = list(stubs.ft.StreamJobEvents(F.StreamJobEventsRequest(job_id=job.id), timeout=60))
    assert events[-1].type == "succeeded", events[-1]
    known.jobs.append(job.id)
    known.adapters.append(job.id)
    known.log = b"".join(
        p.chunk
        for p in stubs.ad.ExportUpdateLog(adapters_pb2.ExportUpdateLogRequest(job_id=job.id), timeout=30)
    )
    return greedy(stubs)


def greedy(stubs: Any) -> list[int]:
    req = generation_pb2.GenerateRequest(
        text="5 17 3 42",
        stopping=generation_pb2.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
        sampling=generation_pb2.SamplingParams(temperature=0),
    )
    return [t for m in stubs.gen.Generate(req, timeout=30) for t in m.token_ids]


@contextmanager
def lowered_limits(limit: int):
    from zostream.server import adapters_service, finetuning_service

    saved = finetuning_service.MAX_DATASET_BYTES, adapters_service.MAX_LOG_BYTES
    finetuning_service.MAX_DATASET_BYTES = adapters_service.MAX_LOG_BYTES = limit
    try:
        yield
    finally:
        finetuning_service.MAX_DATASET_BYTES, adapters_service.MAX_LOG_BYTES = saved


def run(n: int, seed: int, workdir: Path, audit: Audit | None = None) -> dict[str, Any]:
    """Fuzz a fresh in-thread server with n generated requests; returns the figures."""
    audit = audit or Audit()
    model = tiny_model(workdir / "models")
    data = workdir / "data"
    outside_before = sorted(p.name for p in workdir.iterdir())
    known = Known()
    t0 = time.monotonic()
    cfg = server_config(model, data, engine=engine_config(model))
    with lowered_limits(LIMIT), thread_server(cfg) as srv:
        stubs = srv.stubs()
        want = setup(stubs, known)
        fz = Fuzzer(stubs.channel, known, data, model)
        audit.active = True
        try:
            fz.sweep()
            fz.run(n, seed)
        finally:
            audit.active = False
        serving = stubs.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        engine_alive = srv.app._thread.is_alive() and srv.app.engine_error is None
        got = greedy(stubs)
        stubs.channel.close()
    outside = audit.outside(data, model)
    new_top = sorted(set(p.name for p in workdir.iterdir()) - set(outside_before) - {"data"})
    codes: Counter[str] = Counter()
    for k, v in fz.counts.items():
        codes[k.split()[1]] += v
    fig = {
        "requests": fz.requests,
        "generated_examples": n,
        "seed": seed,
        "seconds": round(time.monotonic() - t0, 1),
        "codes": dict(codes),
        "by_rpc": dict(sorted(fz.counts.items())),
        "rpcs_covered": sorted({k.split()[0] for k in fz.counts}),
        "failures": len(fz.failures),
        "failure_examples": sorted(set(fz.failures))[:20],
        "internal_or_unknown": codes.get("INTERNAL", 0) + codes.get("UNKNOWN", 0),
        "serving_after": serving == health_pb2.HealthCheckResponse.SERVING,
        "engine_alive_after": engine_alive,
        "greedy_unchanged": got == want,
        "writes_outside_data_dir": outside["writes"][:20],
        "reads_outside_allowed": outside["reads"][:20],
        "new_files_next_to_data_dir": new_top,
        "files_written": len(audit.writes),
        "seconds_by_rpc": {k: round(v, 1) for k, v in fz.seconds.most_common()},
        "latency_p99_ms": round(1e3 * sorted(fz.latencies)[int(0.99 * (len(fz.latencies) - 1))], 1),
        "jobs_created": len(known.jobs) - 1,
        "datasets_uploaded": len(known.datasets) - 1,
        "adapters_imported": len(known.adapters) - 1,
    }
    fig["ok"] = bool(
        not fz.failures
        and fig["serving_after"]
        and engine_alive
        and fig["greedy_unchanged"]
        and not outside["writes"]
        and not outside["reads"]
        and not new_top
    )
    return fig


def summary(f: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("all held", f["ok"]),
        (
            "requests fuzzed (hypothesis examples, seed)",
            f"{f['requests']} ({f['generated_examples']}, {f['seed']})",
        ),
        ("RPCs covered", f"{len(f['rpcs_covered'])}: {', '.join(f['rpcs_covered'])}"),
        ("statuses", ", ".join(f"{k} {v}" for k, v in sorted(f["codes"].items()))),
        ("undocumented statuses / INTERNAL or UNKNOWN", f"{f['failures']} / {f['internal_or_unknown']}"),
        (
            "jobs created / datasets uploaded / adapters imported",
            f"{f['jobs_created']} / {f['datasets_uploaded']} / {f['adapters_imported']}",
        ),
        (
            "SERVING, engine alive, greedy output unchanged after",
            f"{f['serving_after']}, {f['engine_alive_after']}, {f['greedy_unchanged']}",
        ),
        (
            "file writes by the server / outside the data dir",
            f"{f['files_written']} / {len(f['writes_outside_data_dir'])}",
        ),
        ("reads outside data dir, model and Python", len(f["reads_outside_allowed"])),
        ("wall seconds / p99 latency (ms)", f"{f['seconds']} / {f['latency_p99_ms']}"),
    ]
    return "## Fuzz (stress/fuzz.py)\n\n" + markdown_table(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stress.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="generated requests (hypothesis examples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 1_000_000:
        p.error("--requests must be in 1..1000000")
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="zostream-fuzz-") as tmp:
        fig = run(args.requests, args.seed, Path(tmp))
    report(fig, summary(fig), args.json_out)
    return 0 if fig["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
