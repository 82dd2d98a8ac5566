"""Security and hostile input: the API key guards every RPC but health (compared in constant time, over TLS
with a self-signed certificate); names cannot reach outside the data dir; uploads and imported logs are
size-limited and validated; and the hostile inputs the fuzzer found are answered with documented statuses
(each case below was an INTERNAL, a hang, a leaked KV slot or an aborted batch before its fix).
"""

from __future__ import annotations

import hmac
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from stress.fuzz import METHODS
from tests.server.conftest import Stubs, ThreadServer, server_config, thread_server
from tests.server.test_server import self_signed
from zostream.defaults import NAME_MAX_CHARS
from zostream.v1 import adapters_pb2 as A
from zostream.v1 import common_pb2 as Cm
from zostream.v1 import finetuning_pb2 as F
from zostream.v1 import generation_pb2 as G

KEY = "s3cret-key-for-tests-0123456789"
ZOSTREAM = [m for m in METHODS.values() if m.containing_service.full_name.startswith("zostream.")]


def raw_call(channel: grpc.Channel, m: Any, payload: bytes, metadata=None, timeout: float = 10) -> None:
    path = f"/{m.containing_service.full_name}/{m.name}"
    ident = lambda b: b  # noqa: E731
    if m.client_streaming:
        channel.stream_unary(path, ident, ident)(iter([payload]), metadata=metadata, timeout=timeout)
    elif m.server_streaming:
        list(channel.unary_stream(path, ident, ident)(payload, metadata=metadata, timeout=timeout))
    else:
        channel.unary_unary(path, ident, ident)(payload, metadata=metadata, timeout=timeout)


def code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---- auth + TLS ------------------------------------------------------------------------------------
def test_every_rpc_needs_the_key_but_health(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, pkey = self_signed(tmp_path)
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)
    cfg = server_config(tiny, tmp_path / "data", api_key=KEY, tls_cert=str(cert), tls_key=str(pkey))
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with thread_server(cfg) as srv:
        ch = grpc.secure_channel(
            f"127.0.0.1:{srv.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        from grpc_reflection.v1alpha import reflection_pb2

        reflection = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods_by_name[
            "ServerReflectionInfo"
        ]
        assert len(ZOSTREAM) == 23
        for m in [*ZOSTREAM, reflection]:
            for md in (None, [("authorization", "Bearer " + KEY[:-1] + "x")], [("authorization", KEY)]):
                n = len(seen)
                assert code(lambda m=m, md=md: raw_call(ch, m, b"", md)) == grpc.StatusCode.UNAUTHENTICATED, (
                    m.name,
                    md,
                )
                # One constant-time comparison per call, of the presented token against the key.
                assert len(seen) == n + 1 and seen[-1][1] == KEY.encode(), m.name
            good = code(lambda m=m: raw_call(ch, m, b"", [("authorization", f"Bearer {KEY}")], timeout=2))
            assert good not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
            )
        s = Stubs(ch)
        assert (
            s.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        plain = grpc.insecure_channel(f"127.0.0.1:{srv.port}")  # no TLS: no answer at all
        assert code(lambda: Stubs(plain).health.Check(health_pb2.HealthCheckRequest(), timeout=3)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        plain.close()
        ch.close()


# ---- a shared server for the rest ------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with thread_server(server_config(tiny, tmp_path_factory.mktemp("sec") / "data")) as s:
        yield s


@pytest.fixture(scope="module")
def s(srv: ThreadServer) -> Iterator[Stubs]:
    stubs = srv.stubs()
    data = "\n".join(
        json.dumps({"text": f"{i} {i + 1} {i + 2} {i + 3} {i + 4}"}) for i in range(1, 30)
    ).encode()
    stubs.ft.UploadDataset(
        iter(
            [F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="d")), F.UploadDatasetRequest(chunk=data)]
        ),
        timeout=30,
    )
    yield stubs
    stubs.channel.close()


@pytest.fixture(scope="module")
def adapter(s: Stubs) -> str:
    hp = F.Hyperparameters(
        steps=3,
        learning_rate=0.1,
        eps=0.05,
        batch_size=2,
        seed=1,
        max_len=32,
        lora=Cm.LoraConfig(r=2, alpha=4.0, target_modules=["q_proj"]),
    )
    job = s.ft.CreateJob(
        F.CreateJobRequest(method=Cm.TUNING_METHOD_LORA, training_dataset="d", hyperparameters=hp)
    )
    assert (
        list(s.ft.StreamJobEvents(F.StreamJobEventsRequest(job_id=job.id), timeout=60))[-1].type
        == "succeeded"
    )
    return job.id


def export(s: Stubs, job_id: str) -> bytes:
    return b"".join(
        p.chunk for p in s.ad.ExportUpdateLog(A.ExportUpdateLogRequest(job_id=job_id), timeout=30)
    )


def import_log(s: Stubs, aid: str, data: bytes) -> A.Adapter:
    parts = [
        A.ImportUpdateLogRequest(metadata=A.ImportUpdateLogMetadata(adapter_id=aid)),
        A.ImportUpdateLogRequest(chunk=data),
    ]
    return s.ad.ImportUpdateLog(iter(parts), timeout=60)


def gen(text: str = "5 6 7", n: int = 8, **kw: Any) -> G.GenerateRequest:
    return G.GenerateRequest(text=text, stopping=G.StoppingCriteria(max_new_tokens=n, ignore_eos=True), **kw)


# ---- names, paths, sizes -----------------------------------------------------------------------------
TRAVERSAL = [
    "../evil",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "..",
    "name\n",
    "a\x00b",
    "x" * (NAME_MAX_CHARS + 1),  # one past the documented 1-128
    ".hidden",
]


def test_names_never_reach_outside_the_data_dir(srv: ThreadServer, s: Stubs, adapter: str) -> None:
    data = Path(srv.cfg.data_dir)
    before = sorted(p.name for p in data.parent.iterdir())
    for bad in TRAVERSAL:
        up = [
            F.UploadDatasetRequest(metadata=F.DatasetMetadata(name=bad)),
            F.UploadDatasetRequest(chunk=b'{"text": "1 2"}'),
        ]
        calls = {
            "UploadDataset": lambda up=up: s.ft.UploadDataset(iter(up), timeout=10),
            "CreateJob": lambda bad=bad: s.ft.CreateJob(
                F.CreateJobRequest(
                    method=Cm.TUNING_METHOD_LORA,
                    training_dataset=bad,
                    hyperparameters=F.Hyperparameters(steps=1),
                )
            ),
            "ImportUpdateLog": lambda bad=bad: import_log(s, bad, export(s, adapter)),
            "ExportUpdateLog": lambda bad=bad: list(
                s.ad.ExportUpdateLog(A.ExportUpdateLogRequest(adapter_id=bad))
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, bad, exc.value.details())
            assert srv.cfg.data_dir not in exc.value.details()
    # A job's log cannot be reached as an "adapter" path either.
    with pytest.raises(grpc.RpcError) as exc:
        list(s.ad.ExportUpdateLog(A.ExportUpdateLogRequest(adapter_id=f"../jobs/{adapter}")))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(p.name for p in data.parent.iterdir()) == before
    assert sorted(p.name for p in (data / "datasets").iterdir()) == ["d.json", "d.jsonl"]


def test_uploads_and_imports_are_size_limited(
    s: Stubs, adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zostream.server import adapters_service, finetuning_service

    monkeypatch.setattr(finetuning_service, "MAX_DATASET_BYTES", 1000)
    monkeypatch.setattr(adapters_service, "MAX_LOG_BYTES", 1000)
    line = b'{"text": "1 2 3"}\n'
    parts = [F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="big"))]
    parts += [F.UploadDatasetRequest(chunk=line * 5)] * 20  # 1900 bytes in 20 messages
    with pytest.raises(grpc.RpcError) as exc:
        s.ft.UploadDataset(iter(parts), timeout=10)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1000 bytes" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        import_log(s, "big", export(s, adapter) + b"\0" * 1000)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1000 bytes" in exc.value.details()
    # One message past the transport's 8 MiB limit is refused before it reaches a handler.
    with pytest.raises(grpc.RpcError) as exc:
        s.ft.UploadDataset(iter([parts[0], F.UploadDatasetRequest(chunk=b"x" * (9 * 2**20))]), timeout=30)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- hostile inputs (regressions of what the fuzzer found) ---------------------------------------------
@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x03\xff\xc0\xfe", b"\x12\x02\xff\xfe", b"\x08"])
def test_corrupt_messages_are_invalid_argument(s: Stubs, payload: bytes) -> None:
    for m in METHODS.values():
        got = code(lambda m=m: raw_call(s.channel, m, payload, timeout=5))
        assert got in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (
            m.name,
            got,
        )


@pytest.mark.parametrize(
    "data, where",
    [
        # nesting past the recursion limit: refused before parsing, naming the line
        (b'{"text": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "line 1"),
        (b'{"text": 1' + b"0" * 5000 + b"}", "chunk"),  # an integer past int_max_str_digits
        (b'{"text": "1 \\udc80 2"}', "chunk"),  # a lone surrogate
    ],
)
def test_hostile_json_records_are_invalid_argument(s: Stubs, data: bytes, where: str) -> None:
    parts = [
        F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="hostile")),
        F.UploadDatasetRequest(chunk=data),
    ]
    with pytest.raises(grpc.RpcError) as exc:
        s.ft.UploadDataset(iter(parts), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and where in exc.value.details()


def test_duplicate_in_flight_request_id(srv: ThreadServer, s: Stubs) -> None:
    first = s.gen.Generate(gen(n=100, stream=True, request_id="dup"), timeout=60)
    next(first)
    with pytest.raises(grpc.RpcError) as exc:
        list(s.gen.Generate(gen(request_id="dup"), timeout=10))
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in exc.value.details()
    assert sum(len(m.token_ids) for m in first) == 99  # the first request is untouched
    engine = srv.app.engine
    deadline = time.monotonic() + 5
    while engine.seqs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(engine.scheduler.free_slots) == list(range(engine.limits.max_batch))  # no leaked KV slot


def test_concurrent_imports_of_one_id(srv: ThreadServer, s: Stubs, adapter: str) -> None:
    log = export(s, adapter)

    def one(_: int) -> grpc.StatusCode:
        return code(lambda: import_log(s, "same-id", log))

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(4)))
    assert sorted(c.name for c in codes) == ["ALREADY_EXISTS"] * 3 + ["OK"], codes
    adapters = Path(srv.cfg.data_dir) / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["same-id"]  # no staging directory left
    s.ad.DeleteAdapter(A.DeleteAdapterRequest(adapter_id="same-id"), timeout=30)


def crafted(log: bytes, **changes: Any) -> bytes:
    """The log with header fields changed (same format version, records untouched)."""
    n = struct.unpack_from("<I", log, 8)[0]
    header = json.loads(log[12 : 12 + n]) | changes
    js = json.dumps(header).encode()
    return log[:8] + struct.pack("<I", len(js)) + js + struct.pack("<I", zlib.crc32(js)) + log[12 + n + 4 :]


def test_imported_logs_are_validated(s: Stubs, adapter: str) -> None:
    log = export(s, adapter)
    with pytest.raises(grpc.RpcError) as exc:  # weight decay 1e300 replays to inf / NaN weights
        import_log(s, "nan-weights", crafted(log, weight_decay=1e300))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:  # its noise would replay differently here
        import_log(s, "future", crafted(log, generator_version=999))
    assert (
        exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "generator version" in exc.value.details()
    )
    with pytest.raises(grpc.RpcError) as exc:
        import_log(
            s,
            "nested",
            log[:6]
            + struct.pack("<HI", 1, 40_000)
            + b"[" * 40_000
            + struct.pack("<I", zlib.crc32(b"[" * 40_000)),
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_diverged_adapter_fails_only_its_own_requests(srv: ThreadServer, s: Stubs, adapter: str) -> None:
    aid = import_log(s, "diverged", export(s, adapter)).id
    for t in srv.app.engine.adapters[aid].tensors.values():
        t.fill_(float("nan"))  # as a job trained with a huge learning rate could leave it
    out: dict[str, list] = {}

    def base() -> None:
        out["base"] = list(s.gen.Generate(gen(n=64, stream=True), timeout=60))

    t = threading.Thread(target=base)
    t.start()
    for temperature in (0.0, 1.0):
        msgs = list(
            s.gen.Generate(
                gen(adapter_id=aid, sampling=G.SamplingParams(temperature=temperature)), timeout=30
            )
        )
        assert msgs[-1].finish_reason == G.FINISH_REASON_ERROR and "non-finite" in msgs[-1].error.message
    t.join(60)
    assert sum(len(m.token_ids) for m in out["base"]) == 64  # its batch-mate was not aborted
    assert out["base"][-1].finish_reason == G.FINISH_REASON_MAX_TOKENS
    s.ad.DeleteAdapter(A.DeleteAdapterRequest(adapter_id=aid), timeout=30)


def test_delete_adapter_while_it_generates(s: Stubs, adapter: str) -> None:
    aid = import_log(s, "busy", export(s, adapter)).id
    call = s.gen.Generate(gen(n=80, stream=True, adapter_id=aid), timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as exc:
        s.ad.DeleteAdapter(A.DeleteAdapterRequest(adapter_id=aid), timeout=30)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "generating" in exc.value.details()
    assert sum(len(m.token_ids) for m in call) == 79
    s.ad.DeleteAdapter(A.DeleteAdapterRequest(adapter_id=aid), timeout=30)
    assert code(lambda: list(s.gen.Generate(gen(adapter_id=aid), timeout=10))) == grpc.StatusCode.NOT_FOUND
