"""The API does what its proto comments say.

Two halves: the comments state the defaults and limits of zostream/defaults.py (parsed from the
.proto sources, not from the code that serves them), and a live server behaves as those comments say
(checked against expectations computed here from the comments' wording: greedy tokens, str.find on the
unstopped text, page lengths, resolved job settings).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest

from tests.server.conftest import Stubs, ThreadServer
from zostream import defaults as D
from zostream.v1 import common_pb2 as Cm
from zostream.v1 import finetuning_pb2 as F
from zostream.v1 import generation_pb2 as G

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "zostream" / "v1"
_FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?(?:map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*;")


def proto_comments() -> dict[str, str]:
    """ "Message.field" -> the field's leading comment (lines joined with spaces), for every .proto."""
    out: dict[str, str] = {}
    for path in sorted(PROTO_DIR.glob("*.proto")):
        stack: list[str] = []
        comment: list[str] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("//"):
                comment.append(line[2:].strip())
                continue
            if m := re.match(r"(message|enum|service)\s+(\w+)\s*\{", line):
                stack.append(m.group(2))
            elif re.match(r"oneof\s+\w+\s*\{", line):
                stack.append("")  # a oneof's fields belong to the enclosing message
            elif line.startswith("}"):
                stack.pop()
            elif (m := _FIELD.match(line)) and stack:
                owner = next(s for s in reversed(stack) if s)
                out[f"{owner}.{m.group(1)}"] = " ".join(comment)
            comment = []
    return out


def test_the_proto_comments_state_the_defaults() -> None:
    comments = proto_comments()
    missing = [k for k in D.DOCUMENTED if k not in comments]
    assert not missing, f"fields not found in the protos: {missing}"
    wrong = {k: (phrase, comments[k]) for k, phrase in D.DOCUMENTED.items() if phrase not in comments[k]}
    assert not wrong, "proto comments that do not say what zostream/defaults.py says:\n" + "\n".join(
        f"  {k}: wants {p!r}\n    has {c!r}" for k, (p, c) in wrong.items()
    )


def test_the_parser_finds_fields() -> None:
    """A parser that found nothing would make the test above pass on missing fields only."""
    c = proto_comments()
    assert "Softmax temperature" in c["SamplingParams.temperature"]
    assert "Text, tokenized" in c["GenerateRequest.text"]  # inside the prompt oneof
    assert len(c) > 150


# ---- a live server -----------------------------------------------------------------------------------
def _gen(stubs: Stubs, **kw) -> G.GenerateResponse:
    (r,) = list(stubs.gen.Generate(G.GenerateRequest(**kw), timeout=60))
    return r


def _words(prefix: str = "5 9 13") -> G.GenerateRequest:
    return G.GenerateRequest(text=prefix)


def test_unset_sampling_is_greedy(stubs: Stubs) -> None:
    stop = G.StoppingCriteria(max_new_tokens=12, ignore_eos=True)
    greedy = _gen(stubs, text="5 9 13", sampling=G.SamplingParams(temperature=0), stopping=stop)
    for seed in (1, 2):  # sampled at temperature 1 these would differ
        r = _gen(stubs, text="5 9 13", sampling=G.SamplingParams(seed=seed), stopping=stop)
        assert list(r.token_ids) == list(greedy.token_ids)
    r = _gen(stubs, text="5 9 13", stopping=stop)
    assert list(r.token_ids) == list(greedy.token_ids)
    # and temperature 1 does sample: two seeds give two different continuations
    s1, s2 = (
        _gen(stubs, text="5 9 13", sampling=G.SamplingParams(temperature=1, seed=s), stopping=stop)
        for s in (1, 2)
    )
    assert list(s1.token_ids) != list(s2.token_ids)


def test_max_new_tokens_default(stubs: Stubs) -> None:
    r = _gen(stubs, text="5", stopping=G.StoppingCriteria(ignore_eos=True))
    assert (r.usage.completion_tokens, r.finish_reason) == (D.MAX_NEW_TOKENS, G.FINISH_REASON_MAX_TOKENS)


def _unstopped(stubs: Stubs, n: int = 24) -> G.GenerateResponse:
    return _gen(stubs, text="7 3", stopping=G.StoppingCriteria(max_new_tokens=n, ignore_eos=True))


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_is_cut_or_kept_as_asked(stubs: Stubs, include: bool, stream: bool) -> None:
    full = _unstopped(stubs)
    words = full.text.split()
    stop = " ".join(words[3:5])  # two words: matched across tokens
    i = full.text.find(stop)
    assert i > 0
    want = full.text[: i + len(stop)] if include else full.text[:i]
    req = G.GenerateRequest(
        text="7 3",
        stream=stream,
        stopping=G.StoppingCriteria(
            max_new_tokens=24, ignore_eos=True, stop=[stop], include_stop_sequence=include
        ),
    )
    msgs = list(stubs.gen.Generate(req, timeout=60))
    assert "".join(m.text for m in msgs) == want
    last = msgs[-1]
    assert last.finish_reason == G.FINISH_REASON_STOP_SEQUENCE
    ids = [t for m in msgs for t in m.token_ids]
    assert ids == list(full.token_ids[: len(ids)])  # the tokens that produced the match stay
    assert last.usage.completion_tokens == len(ids)
    if stream:  # text held back while it could start the stop sequence is never streamed ahead of it
        assert all(
            not m.text or want.startswith("".join(x.text for x in msgs[: k + 1])) for k, m in enumerate(msgs)
        )


def test_held_back_text_is_flushed_when_the_stop_never_comes(stubs: Stubs) -> None:
    full = _unstopped(stubs, 6)
    stop = full.text + " and more"  # the whole output is a prefix of it: held back to the end
    r = _gen(stubs, text="7 3", stopping=G.StoppingCriteria(max_new_tokens=6, ignore_eos=True, stop=[stop]))
    assert (r.text, r.finish_reason) == (full.text, G.FINISH_REASON_MAX_TOKENS)


def test_stop_token_ids_end_as_eos(stubs: Stubs) -> None:
    full = _unstopped(stubs)
    tok = full.token_ids[2]
    k = list(full.token_ids).index(tok)
    r = _gen(
        stubs,
        text="7 3",
        stopping=G.StoppingCriteria(max_new_tokens=24, ignore_eos=True, stop_token_ids=[tok]),
    )
    assert r.finish_reason == G.FINISH_REASON_EOS_TOKEN
    assert list(r.token_ids) == list(full.token_ids[: k + 1])
    assert r.usage.completion_tokens == k + 1


def test_names_are_1_to_128_characters(stubs: Stubs) -> None:
    ok = "n" * D.NAME_MAX_CHARS
    ds = stubs.ft.UploadDataset(
        iter(
            [
                F.UploadDatasetRequest(metadata=F.DatasetMetadata(name=ok)),
                F.UploadDatasetRequest(chunk=b'{"text": "1 2"}'),
            ]
        ),
        timeout=30,
    )
    assert ds.name == ok
    with pytest.raises(grpc.RpcError) as exc:
        stubs.ft.UploadDataset(
            iter([F.UploadDatasetRequest(metadata=F.DatasetMetadata(name=ok + "n"))]), timeout=30
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_datasets_default_page_size(stubs: Stubs) -> None:
    have = len(
        list(stubs.ft.ListDatasets(F.ListDatasetsRequest(page_size=D.MAX_PAGE_SIZE), timeout=30).datasets)
    )
    for i in range(D.PAGE_SIZE["ListDatasets"] + 1 - have):
        stubs.ft.UploadDataset(
            iter(
                [
                    F.UploadDatasetRequest(metadata=F.DatasetMetadata(name=f"page-{i:03d}")),
                    F.UploadDatasetRequest(chunk=b'{"text": "1 2"}'),
                ]
            ),
            timeout=30,
        )
    page = stubs.ft.ListDatasets(F.ListDatasetsRequest(), timeout=30)
    assert len(page.datasets) == D.PAGE_SIZE["ListDatasets"] and page.next_page_token
    assert (
        len(stubs.ft.ListDatasets(F.ListDatasetsRequest(page_size=5000), timeout=30).datasets)
        <= D.MAX_PAGE_SIZE
    )


def _wait_terminal(stubs: Stubs, job_id: str, timeout: float = 120) -> F.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stubs.ft.GetJob(F.GetJobRequest(job_id=job_id), timeout=10)
        if job.status in (F.JOB_STATUS_SUCCEEDED, F.JOB_STATUS_FAILED, F.JOB_STATUS_CANCELLED):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def contract_dataset(stubs: Stubs) -> str:
    data = b"".join(b'{"prompt": "%d %d", "completion": " %d"}\n' % (i, i + 1, i + 2) for i in range(1, 40))
    stubs.ft.UploadDataset(
        iter(
            [
                F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="contract")),
                F.UploadDatasetRequest(chunk=data),
            ]
        ),
        timeout=30,
    )
    return "contract"


def test_job_settings_resolve_to_the_documented_defaults(stubs: Stubs, contract_dataset: str) -> None:
    req = F.CreateJobRequest(
        method=Cm.TUNING_METHOD_LORA,
        training_dataset=contract_dataset,
        hyperparameters=F.Hyperparameters(steps=3),
        idempotency_key="contract-defaults",
    )
    job = stubs.ft.CreateJob(req, timeout=30)
    hp = job.hyperparameters
    # No estimator asked for: auto, i.e. grzo for LoRA with its documented defaults (8 records, 4 groups).
    assert (hp.estimator, hp.lr_schedule) == ("grzo", F.LR_SCHEDULE_COSINE)
    assert (hp.batch_size, hp.q, hp.max_len) == (D.BATCH_SIZE, D.GRZO_Q, D.MAX_LEN)
    assert (hp.learning_rate, hp.eps) == (D.GRZO_LR["lora"], D.GRZO_EPS["lora"])
    assert (hp.lora.r, hp.lora.alpha, list(hp.lora.target_modules), hp.lora.init_scale) == (
        D.LORA_R,
        D.lora_alpha(D.LORA_R),
        list(D.LORA_TARGETS),
        D.LORA_INIT_SCALE,
    )
    assert hp.master_dtype == D.LORA_MASTER_DTYPE  # a documented value, never "auto"
    assert (hp.checkpoint_every, hp.eval_every) == (0, 0)
    assert hp.HasField("seed") and hp.seed != 0  # picked by the server
    again = stubs.ft.CreateJob(req, timeout=30)  # a retry returns the first job, its picked seed included
    assert (again.id, again.hyperparameters.seed) == (job.id, hp.seed)
    other = stubs.ft.CreateJob(
        F.CreateJobRequest(
            method=Cm.TUNING_METHOD_LORA,
            training_dataset=contract_dataset,
            hyperparameters=F.Hyperparameters(steps=1),
        ),
        timeout=30,
    )
    assert other.hyperparameters.seed != hp.seed
    done = _wait_terminal(stubs, job.id)
    assert done.status == F.JOB_STATUS_SUCCEEDED, done.error.message
    # checkpoint_every 0: no checkpoint before the last step
    assert not stubs.ft.ListCheckpoints(F.ListCheckpointsRequest(job_id=job.id), timeout=10).checkpoints
    # JobMetrics.step counts steps done, as progress does
    assert done.metrics.step == done.progress.steps_done == 3
    # cancelling a finished job changes nothing
    again = stubs.ft.CancelJob(F.CancelJobRequest(job_id=job.id), timeout=10)
    assert (again.status, again.finished_at) == (done.status, done.finished_at)
    _wait_terminal(stubs, other.id)


def _resolved(stubs: Stubs, dataset: str, method: str, hp: dict) -> F.Hyperparameters:
    """The hyperparameters a one-step job reports once created (then cancelled)."""
    meth = {"full": Cm.TUNING_METHOD_FULL, "lora": Cm.TUNING_METHOD_LORA}[method]
    job = stubs.ft.CreateJob(
        F.CreateJobRequest(
            method=meth, training_dataset=dataset, hyperparameters=F.Hyperparameters(steps=1, **hp)
        ),
        timeout=30,
    )
    stubs.ft.CancelJob(F.CancelJobRequest(job_id=job.id), timeout=10)
    _wait_terminal(stubs, job.id)
    return job.hyperparameters


@pytest.mark.parametrize(
    ("method", "hp", "want"),
    [
        # (estimator, q, lr, eps, schedule) each request resolves to, from the documented constants
        ("full", {}, ("grzo", D.GRZO_Q, D.GRZO_LR["full"], D.GRZO_EPS["full"], F.LR_SCHEDULE_COSINE)),
        (
            "full",
            {"estimator": "fzoo"},
            ("fzoo", D.FZOO_Q, D.FZOO_LR["full"], D.FZOO_EPS["full"], F.LR_SCHEDULE_CONSTANT),
        ),
        ("lora", {"q": 1}, ("mezo", 1, D.LR["lora"], D.EPS, F.LR_SCHEDULE_CONSTANT)),
        ("full", {"estimator": "mezo"}, ("mezo", D.Q, D.LR["full"], D.EPS, F.LR_SCHEDULE_CONSTANT)),
        (
            "lora",
            {"estimator": "fzoo"},
            ("fzoo", D.FZOO_Q, D.FZOO_LR["lora"], D.FZOO_EPS["lora"], F.LR_SCHEDULE_CONSTANT),
        ),
        ("lora", {"batch_size": 6}, ("grzo", 3, D.GRZO_LR["lora"], D.GRZO_EPS["lora"], F.LR_SCHEDULE_COSINE)),
    ],
)
def test_each_estimator_reports_its_documented_defaults(
    stubs: Stubs, contract_dataset: str, method: str, hp: dict, want: tuple
) -> None:
    h = _resolved(stubs, contract_dataset, method, hp)
    assert (h.estimator, h.q, h.learning_rate, h.eps, h.lr_schedule) == pytest.approx(want)


def test_checkpoints_and_events_carry_jobmetrics_names(stubs: Stubs, contract_dataset: str) -> None:
    job = stubs.ft.CreateJob(
        F.CreateJobRequest(
            method=Cm.TUNING_METHOD_LORA,
            training_dataset=contract_dataset,
            hyperparameters=F.Hyperparameters(steps=3, checkpoint_every=1, batch_size=2),
        ),
        timeout=30,
    )
    _wait_terminal(stubs, job.id)
    cps = stubs.ft.ListCheckpoints(F.ListCheckpointsRequest(job_id=job.id), timeout=10).checkpoints
    assert [c.step for c in cps] == [1, 2]  # the last step exports instead
    fields = set(F.JobMetrics.DESCRIPTOR.fields_by_name)
    for c in cps:
        assert "train_loss" in c.metrics and set(c.metrics) <= fields | {"tokens_per_second", "step_seconds"}
    events = stubs.ft.ListJobEvents(F.ListJobEventsRequest(job_id=job.id), timeout=10).events
    for e in events:
        assert set(e.metrics) <= fields | {"tokens_per_second", "step_seconds"}, (e.type, dict(e.metrics))


@pytest.mark.parametrize(
    ("method", "hp", "want"),
    [
        ("lora", {}, D.AVERAGE_DECAY["lora"]),
        ("lora", {"average_decay": 0.0}, 0.0),
        ("lora", {"average_decay": 0.5}, 0.5),
        ("full", {}, 0.0),
    ],
)
def test_average_decay_reports_what_the_job_serves(
    stubs: Stubs, contract_dataset: str, method: str, hp: dict, want: float
) -> None:
    h = _resolved(stubs, contract_dataset, method, hp)
    assert h.HasField("average_decay") and h.average_decay == want


@pytest.mark.parametrize(("method", "decay"), [("full", 0.9), ("lora", 1.0), ("lora", -0.5)])
def test_average_decay_refused_with_the_field(stubs: Stubs, contract_dataset: str, method: str, decay: float):
    meth = {"full": Cm.TUNING_METHOD_FULL, "lora": Cm.TUNING_METHOD_LORA}[method]
    hp = F.Hyperparameters(steps=1, average_decay=decay)
    with pytest.raises(grpc.RpcError) as exc:
        stubs.ft.CreateJob(
            F.CreateJobRequest(method=meth, training_dataset=contract_dataset, hyperparameters=hp), timeout=30
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hyperparameters.average_decay" in exc.value.details()
    assert ("full-parameter" in exc.value.details()) == (method == "full")


def test_lora_init_scale_reaches_the_job(stubs: Stubs, contract_dataset: str, tmp_path: Path) -> None:
    """LoraConfig.init_scale is reported by the job and is the scale its update log's scope records (what
    replay rebuilds the initial factors from)."""
    from tests.server.test_server import export_log
    from zostream.engine.update_log import read_header

    hp = F.Hyperparameters(steps=1, lora=Cm.LoraConfig(init_scale=2.5))
    job = stubs.ft.CreateJob(
        F.CreateJobRequest(
            method=Cm.TUNING_METHOD_LORA, training_dataset=contract_dataset, hyperparameters=hp
        ),
        timeout=30,
    )
    assert job.hyperparameters.lora.init_scale == 2.5
    done = _wait_terminal(stubs, job.id)
    assert done.status == F.JOB_STATUS_SUCCEEDED, done.error.message
    (tmp_path / "update.log").write_bytes(export_log(stubs, job_id=job.id))
    assert read_header(tmp_path / "update.log").scope["init_scale"] == 2.5


@pytest.mark.parametrize("scale", [0.0, -1.0, 101.0, float("nan")])
def test_lora_init_scale_refused_with_the_field(stubs: Stubs, contract_dataset: str, scale: float):
    hp = F.Hyperparameters(steps=1, lora=Cm.LoraConfig(init_scale=scale))
    with pytest.raises(grpc.RpcError) as exc:
        stubs.ft.CreateJob(
            F.CreateJobRequest(
                method=Cm.TUNING_METHOD_LORA, training_dataset=contract_dataset, hyperparameters=hp
            ),
            timeout=30,
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hyperparameters.lora.init_scale" in exc.value.details()


def test_model_info_states_the_server_limit(server: ThreadServer, stubs: Stubs) -> None:
    info = stubs.gen.GetModelInfo(G.GetModelInfoRequest(), timeout=10)
    assert info.max_new_tokens == server.cfg.engine.limits.max_new_tokens
    with pytest.raises(grpc.RpcError) as exc:
        _gen(stubs, text="5", stopping=G.StoppingCriteria(max_new_tokens=info.max_new_tokens + 1))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
