"""The public API: committed stubs match the protos, enum numbers and RPC shapes are pinned, the
wire encoding of GenerateRequest is fixed, and every element of the API is documented.

Enum numbers, field numbers and streaming kinds are wire contracts: the expectations here are
written out by hand, so changing one is a deliberate, visible edit.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

from zostream.v1 import adapters_pb2, finetuning_pb2, generation_pb2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """tools/gen_protos.py, imported from its path (tools/ is not a package)."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) runs protoc")
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ stubs


def test_committed_stubs_are_fresh(gen: ModuleType) -> None:
    stale = gen.stale_files()
    assert stale == [], f"stale generated stubs {stale}: run `python tools/gen_protos.py`"
    assert gen.main(["--check"]) == 0


def test_check_reports_edited_missing_and_orphan_stubs(
    gen: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of the protos and stubs, so the check's failure paths run without touching the tree.
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(ROOT / "zostream" / "v1", tmp_path / "zostream" / "v1")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "PROTO_ROOT", tmp_path / "proto")
    stubs = tmp_path / "zostream" / "v1"
    with open(stubs / "generation_pb2.py", "ab") as f:
        f.write(b"\n")
    (stubs / "adapters_pb2_grpc.py").unlink()
    (stubs / "gone_pb2.py").write_text("# stub of a deleted proto\n")
    (stubs / "notes.py").write_text("# not a stub: ignored\n")

    assert gen.stale_files() == [
        "zostream/v1/adapters_pb2_grpc.py",
        "zostream/v1/generation_pb2.py",
        "zostream/v1/gone_pb2.py",
    ]
    assert gen.main(["--check"]) == 1


# ------------------------------------------------------------------------------------------ enums


def test_finish_reason_numbers() -> None:
    assert dict(generation_pb2.FinishReason.items()) == {
        "FINISH_REASON_UNSPECIFIED": 0,
        "FINISH_REASON_MAX_TOKENS": 1,
        "FINISH_REASON_EOS_TOKEN": 2,
        "FINISH_REASON_STOP_SEQUENCE": 3,
        "FINISH_REASON_CANCELLED": 4,
        "FINISH_REASON_TIME_LIMIT": 5,
        "FINISH_REASON_ERROR": 6,
    }


def test_job_status_numbers() -> None:
    assert dict(finetuning_pb2.JobStatus.items()) == {
        "JOB_STATUS_UNSPECIFIED": 0,
        "JOB_STATUS_QUEUED": 1,
        "JOB_STATUS_RUNNING": 2,
        "JOB_STATUS_CANCELLING": 3,
        "JOB_STATUS_SUCCEEDED": 4,
        "JOB_STATUS_FAILED": 5,
        "JOB_STATUS_CANCELLED": 6,
    }


def test_other_enum_numbers() -> None:
    from zostream.v1 import common_pb2

    assert dict(common_pb2.TuningMethod.items()) == {
        "TUNING_METHOD_UNSPECIFIED": 0,
        "TUNING_METHOD_FULL": 1,
        "TUNING_METHOD_LORA": 2,
    }
    assert dict(finetuning_pb2.LrSchedule.items()) == {
        "LR_SCHEDULE_UNSPECIFIED": 0,
        "LR_SCHEDULE_CONSTANT": 1,
        "LR_SCHEDULE_LINEAR": 2,
        "LR_SCHEDULE_COSINE": 3,
    }
    assert dict(finetuning_pb2.NoiseKind.items()) == {
        "NOISE_KIND_UNSPECIFIED": 0,
        "NOISE_KIND_GAUSSIAN": 1,
        "NOISE_KIND_RADEMACHER": 2,
    }
    assert dict(adapters_pb2.AdapterStatus.items()) == {
        "ADAPTER_STATUS_UNSPECIFIED": 0,
        "ADAPTER_STATUS_TRAINING": 1,
        "ADAPTER_STATUS_READY": 2,
        "ADAPTER_STATUS_STOPPED": 3,
    }


# --------------------------------------------------------------------------------------- services

# method -> (request, response, client_streaming, server_streaming); names without "zostream.v1.".
SERVICES: dict[tuple[ModuleType, str], dict[str, tuple[str, str, bool, bool]]] = {
    (generation_pb2, "TextGeneration"): {
        "Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "Abort": ("AbortRequest", "AbortResponse", False, False),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False, False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False, False),
    },
    (finetuning_pb2, "FineTuning"): {
        "CreateJob": ("CreateJobRequest", "Job", False, False),
        "UploadDataset": ("UploadDatasetRequest", "Dataset", True, False),
        "ListDatasets": ("ListDatasetsRequest", "ListDatasetsResponse", False, False),
        "GetJob": ("GetJobRequest", "Job", False, False),
        "ListJobs": ("ListJobsRequest", "ListJobsResponse", False, False),
        "CancelJob": ("CancelJobRequest", "Job", False, False),
        "ListJobEvents": ("ListJobEventsRequest", "ListJobEventsResponse", False, False),
        "StreamJobEvents": ("StreamJobEventsRequest", "JobEvent", False, True),
        "ListCheckpoints": ("ListCheckpointsRequest", "ListCheckpointsResponse", False, False),
        "GetDataset": ("GetDatasetRequest", "Dataset", False, False),
        "DeleteDataset": ("DeleteDatasetRequest", "DeleteDatasetResponse", False, False),
        "DeleteJob": ("DeleteJobRequest", "DeleteJobResponse", False, False),
    },
    (adapters_pb2, "Adapters"): {
        "ListAdapters": ("ListAdaptersRequest", "ListAdaptersResponse", False, False),
        "GetAdapter": ("GetAdapterRequest", "Adapter", False, False),
        "DeleteAdapter": ("DeleteAdapterRequest", "DeleteAdapterResponse", False, False),
        "ExportUpdateLog": ("ExportUpdateLogRequest", "ExportUpdateLogResponse", False, True),
        "ImportUpdateLog": ("ImportUpdateLogRequest", "Adapter", True, False),
        "DownloadWeights": ("DownloadWeightsRequest", "FileChunk", False, True),
        "ImportPeftAdapter": ("ImportPeftAdapterRequest", "Adapter", True, False),
    },
}


@pytest.mark.parametrize(("module", "service"), list(SERVICES), ids=[s for _, s in SERVICES])
def test_service_methods_and_streaming_kinds(module: ModuleType, service: str) -> None:
    desc = module.DESCRIPTOR.services_by_name[service]
    assert desc.full_name == f"zostream.v1.{service}"
    got = {
        m.name: (
            m.input_type.full_name.removeprefix("zostream.v1."),
            m.output_type.full_name.removeprefix("zostream.v1."),
            m.client_streaming,
            m.server_streaming,
        )
        for m in desc.methods
    }
    assert got == SERVICES[(module, service)]


def test_grpc_modules_expose_stubs_and_servicers() -> None:
    from zostream.v1 import adapters_pb2_grpc, finetuning_pb2_grpc, generation_pb2_grpc

    for grpc_module, service in (
        (generation_pb2_grpc, "TextGeneration"),
        (finetuning_pb2_grpc, "FineTuning"),
        (adapters_pb2_grpc, "Adapters"),
    ):
        assert callable(getattr(grpc_module, f"{service}Stub"))
        assert callable(getattr(grpc_module, f"add_{service}Servicer_to_server"))
        servicer = getattr(grpc_module, f"{service}Servicer")
        for method in SERVICES[next(k for k in SERVICES if k[1] == service)]:
            assert callable(getattr(servicer, method)), f"{service}Servicer.{method}"


# ------------------------------------------------------------------------------------ wire format

_CHAT = generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", content="hi")])

# (oneof field, value, hand-encoded wire bytes). GenerateRequest.text is field 2 (tag 0x12),
# token_ids field 3 (0x1a) holding TokenIds.ids as packed uint32 field 1 (0x0a), chat field 4 (0x22)
# holding Chat.messages field 1 (0x0a) = ChatMessage(role field 1 = 0x0a, content field 2 = 0x12).
PROMPTS = [
    ("text", "hi", b"\x12\x02hi"),
    ("token_ids", generation_pb2.TokenIds(ids=[1, 300]), b"\x1a\x05\x0a\x03\x01\xac\x02"),
    ("chat", _CHAT, b"\x22\x0c\x0a\x0a\x0a\x04user\x12\x02hi"),
]


@pytest.mark.parametrize(("field", "value", "wire"), PROMPTS, ids=[p[0] for p in PROMPTS])
def test_generate_request_prompt_variants_round_trip(field: str, value: object, wire: bytes) -> None:
    req = generation_pb2.GenerateRequest(**{field: value})
    assert req.WhichOneof("prompt") == field
    assert req.SerializeToString() == wire

    back = generation_pb2.GenerateRequest.FromString(wire)
    assert back == req
    assert back.WhichOneof("prompt") == field
    assert getattr(back, field) == value


def test_generate_request_full_round_trip_keeps_presence() -> None:
    req = generation_pb2.GenerateRequest(
        request_id="r-1",
        token_ids=generation_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=generation_pb2.SamplingParams(temperature=0.0, top_p=0.5, top_k=40, seed=0),
        stopping=generation_pb2.StoppingCriteria(
            max_new_tokens=32,
            stop=["\n\n", "END"],
            stop_token_ids=[2],
            ignore_eos=True,
            time_limit_seconds=1.5,
        ),
        adapter_id="lora-abc",
        stream=True,
    )
    back = generation_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    # `optional` fields set to zero stay distinguishable from unset ones (temperature 0 = greedy,
    # seed 0 is a real seed), and unset ones stay unset.
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert back.sampling.HasField("seed") and back.sampling.seed == 0
    assert not back.sampling.HasField("repetition_penalty")
    assert list(back.stopping.stop) == ["\n\n", "END"]
    assert back.stopping.time_limit_seconds == 1.5


def test_optional_zero_is_on_the_wire() -> None:
    # SamplingParams.seed is field 5 (varint tag 0x28); GenerateRequest.sampling is field 5 (0x2a).
    seed_zero = generation_pb2.GenerateRequest(sampling=generation_pb2.SamplingParams(seed=0))
    assert seed_zero.SerializeToString() == b"\x2a\x02\x28\x00"
    no_seed = generation_pb2.GenerateRequest(sampling=generation_pb2.SamplingParams())
    assert no_seed.SerializeToString() == b"\x2a\x00"


# ------------------------------------------------------------------------------------------- docs


def _undocumented(fd: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Services, methods, enums, enum values and fields of one file that have no leading comment."""
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location}
    missing: list[str] = []

    def need(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(f"{fd.name}: {name}")

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]) -> None:
        need(path, e.name)
        for i, v in enumerate(e.value):
            need((*path, 2, i), f"{e.name}.{v.name}")

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...]) -> None:
        if m.options.map_entry:  # synthesised for map<,> fields; documented by the field
            return
        for i, f in enumerate(m.field):
            need((*path, 2, i), f"{m.name}.{f.name}")
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i))
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, 4, i))

    # FileDescriptorProto field numbers: message_type 4, enum_type 5, service 6.
    for i, m in enumerate(fd.message_type):
        message(m, (4, i))
    for i, e in enumerate(fd.enum_type):
        enum(e, (5, i))
    for i, s in enumerate(fd.service):
        need((6, i), s.name)
        for j, meth in enumerate(s.method):
            need((6, i, 2, j), f"{s.name}.{meth.name}")
    return missing


def test_every_field_method_and_enum_value_is_documented(gen: ModuleType) -> None:
    files = gen.descriptor_set().file
    assert sorted(fd.name for fd in files) == [
        "zostream/v1/adapters.proto",
        "zostream/v1/common.proto",
        "zostream/v1/finetuning.proto",
        "zostream/v1/generation.proto",
    ]
    assert all(fd.package == "zostream.v1" for fd in files)
    missing = [name for fd in files for name in _undocumented(fd)]
    assert missing == [], f"add a comment (meaning, units, default) to: {missing}"
