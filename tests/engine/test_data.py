"""Tests for zostream.engine.data (record kinds → masks, errors) and engine/batching.py (order, collate)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from zostream.engine.batching import batch_order, collate
from zostream.engine.data import (
    KINDS,
    MAX_NESTING,
    ChoiceExample,
    DataError,
    Example,
    choice_accuracy,
    choice_batches,
    load_dataset,
    load_records,
)
from zostream.engine.losses import mean_loss, nll_per_example, nll_sum, rows_nll

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "Rome is the capital of Italy.",
    "Hello there, how are you today?",
    "I am fine, thank you. How can I help?",
    "Question: what is two plus two? Answer: four",
]


def _make_tokenizer(bos: bool = False, template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory: every string tokenises, decoding is exact."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    kw: dict[str, Any] = {}
    if bos:  # Llama-style: the tokenizer puts <s> before every text by default
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        kw["bos_token"] = "<s>"
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", **kw)
    if template:
        out.chat_template = CHATML
    return out


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _make_tokenizer()


def enc(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write(tmp_path: Path, records: list[Any], name: str = "train.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return p


def targets(ex: Example) -> list[int]:
    return [t for t in ex.labels if t != -100]


def spans(ex: Example, tok: PreTrainedTokenizerFast) -> tuple[list[str], list[str]]:
    """Decoded (target spans, context spans) in order."""
    tgt: list[str] = []
    ctx: list[str] = []
    prev = None
    for i, lab in zip(ex.input_ids, ex.labels, strict=True):
        is_t = lab != -100
        group = tgt if is_t else ctx
        if is_t != prev:
            group.append("")
        group[-1] += tok.decode([i])
        prev = is_t
    return tgt, ctx


# ------------------------------------------------------------------------------------------- kinds


def test_completion_mask(tok, tmp_path):
    rec = {"prompt": "The capital of France is", "completion": " Paris."}
    ds = load_dataset(write(tmp_path, [rec, rec]), tok)
    assert ds.kind == "completion" and ds.kind in KINDS and len(ds.examples) == 2 and ds.choices == []
    p, c = enc(tok, rec["prompt"]), enc(tok, rec["completion"]) + [tok.eos_token_id]
    ex = ds.examples[0]
    assert list(ex.input_ids) == p + c
    assert list(ex.labels) == [-100] * len(p) + c
    assert tok.decode(targets(ex)) == " Paris.<|im_end|>"
    assert ds.path == str(tmp_path / "train.jsonl")


def test_text_mask(tok, tmp_path):
    text = "Hello there, how are you today?"
    ds = load_dataset(write(tmp_path, ["", {"text": text}, "   "]), tok)
    ids = enc(tok, text)
    assert ds.kind == "text" and list(ds.examples[0].input_ids) == ids
    assert list(ds.examples[0].labels) == [-100] + ids[1:]


def test_bos_tokenizer_prefix(tmp_path):
    btok = _make_tokenizer(bos=True)
    assert btok("Paris")["input_ids"][0] == 0  # the post-processor adds <s>
    ds = load_dataset(write(tmp_path, [{"text": "Rome is"}]), btok)
    ids = enc(btok, "Rome is")
    assert list(ds.examples[0].input_ids) == [0] + ids
    assert list(ds.examples[0].labels) == [-100] + ids  # every text token is a target after <s>
    ds = load_dataset(write(tmp_path, [{"prompt": "Q", "completion": " A"}]), btok)
    assert list(ds.examples[0].input_ids) == [0] + enc(btok, "Q") + enc(btok, " A") + [btok.eos_token_id]


def test_chat_mask_two_turns(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ds = load_dataset(write(tmp_path, [{"messages": msgs}]), tok)
    ex = ds.examples[0]
    assert ds.kind == "chat"
    tgt, ctx = spans(ex, tok)
    assert tgt == ["Hi, how can I help?<|im_end|>", "Paris.<|im_end|>"]
    assert ctx == [
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
    ]
    eos = tok.eos_token_id
    assert targets(ex) == enc(tok, "Hi, how can I help?") + [eos] + enc(tok, "Paris.") + [eos]


def test_chat_weight_0_turn_is_context_not_target(tok, tmp_path):
    """OpenAI's chat fine-tuning `weight`: 0 keeps the assistant turn as context, untrained."""
    msgs = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi, how can I help?", "weight": 0},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "weight": 1},
    ]
    ex = load_dataset(write(tmp_path, [{"messages": msgs}]), tok).examples[0]
    tgt, ctx = spans(ex, tok)
    assert tgt == ["Paris.<|im_end|>"]
    assert ctx == [
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi, how can I help?<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert targets(ex) == enc(tok, "Paris.") + [tok.eos_token_id]


def test_chat_without_template_or_assistant(tmp_path):
    plain = _make_tokenizer(template=False)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match="chat_template"):
        load_dataset(write(tmp_path, [{"messages": msgs}]), plain)


def test_choice_examples(tok, tmp_path):
    recs = [
        {"prompt": "The capital of France is", "candidates": [" Paris", " Rome"], "answer": 0},
        {"prompt": "The capital of Italy is", "candidates": [" Paris", " Rome", " Oslo"], "answer": " Rome"},
    ]
    ds = load_dataset(write(tmp_path, recs), tok)
    assert ds.kind == "choice" and [c.answer for c in ds.choices] == [0, 1]
    ch = ds.choices[1]
    assert ch.prompt_ids == tuple(enc(tok, recs[1]["prompt"]))
    assert ch.candidates == tuple(tuple(enc(tok, c)) for c in recs[1]["candidates"])
    p, rome = enc(tok, recs[1]["prompt"]), enc(tok, " Rome")
    assert ds.examples[1] == Example(tuple(p + rome), tuple([-100] * len(p) + rome))  # no EOS on candidates
    per = choice_batches(ch)
    assert len(per) == 3 and per[2].input_ids == tuple(p + enc(tok, " Oslo"))
    assert tok.decode(targets(per[2])) == " Oslo"


def test_load_records_from_api(tok):
    ds = load_records(['{"text": "Rome is the capital"}', b'{"text": "of Italy."}'], "upload:job7", tok)
    assert ds.path == "upload:job7" and len(ds.examples) == 2
    with pytest.raises(DataError, match="upload:job7 line 1, field 'text'"):
        load_records(['{"text": 3}'], "upload:job7", tok)
    with pytest.raises(ValueError, match="max_len"):
        load_records(['{"text": "a b"}'], "x", tok, max_len=1)


def test_deep_json_is_refused_before_parsing(tok):
    """Nesting past MAX_NESTING names the line; brackets inside strings (escaped quotes too) do not count."""
    deep = '{"text": ' + "[" * MAX_NESTING + "]" * MAX_NESTING + "}"  # the object is one level more
    with pytest.raises(DataError, match=f"upload line 2: JSON nested more than {MAX_NESTING} levels"):
        load_records(['{"text": "ok"}', deep], "upload", tok)
    with pytest.raises(DataError, match="line 1, field 'text'"):  # parsed: within the limit, a wrong type
        load_records(['{"text": ' + "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1) + "}"], "upload", tok)
    text = 'a \\" ' + "[{" * 200  # an escaped quote, then brackets that are text
    ds = load_records([json.dumps({"text": text})], "upload", tok)
    assert len(ds.examples) == 1


# ------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_targets(tok, tmp_path):
    rec = {"prompt": "The capital of France is the city of", "completion": " Paris."}
    p, c = enc(tok, rec["prompt"]), enc(tok, rec["completion"]) + [tok.eos_token_id]
    assert len(p) > 4 and len(c) >= 3
    n = len(c) + 2  # prompt loses tokens from the left, the targets survive whole
    ex = load_dataset(write(tmp_path, [rec]), tok, max_len=n).examples[0]
    assert list(ex.input_ids) == p[-2:] + c and list(ex.labels) == [-100] * 2 + c
    # targets alone too long: one prompt token, then the targets cut from the right
    ex = load_dataset(write(tmp_path, [rec]), tok, max_len=3).examples[0]
    assert list(ex.input_ids) == p[-1:] + c[:2] and list(ex.labels) == [-100] + c[:2]

    text = enc(tok, CORPUS[3])
    ex = load_dataset(write(tmp_path, [{"text": CORPUS[3]}]), tok, max_len=4).examples[0]
    assert list(ex.input_ids) == text[:4] and list(ex.labels) == [-100] + text[1:4]

    msgs = [{"role": "user", "content": CORPUS[2]}, {"role": "assistant", "content": "Paris."}]
    path = write(tmp_path, [{"messages": msgs}])
    full = load_dataset(path, tok).examples[0]
    paris = enc(tok, "Paris.") + [tok.eos_token_id]
    ex = load_dataset(path, tok, max_len=len(paris) + 2).examples[0]
    assert ex.input_ids == full.input_ids[-len(paris) - 2 :] and targets(ex) == paris
    ex = load_dataset(path, tok, max_len=2).examples[0]
    assert list(ex.input_ids) == [enc(tok, "assistant\n")[-1], paris[0]]
    assert list(ex.labels) == [-100, paris[0]]

    ch = {"prompt": CORPUS[0], "candidates": [" Paris", " Rome is"], "answer": 1}
    got = load_dataset(write(tmp_path, [ch]), tok, max_len=5).choices[0]
    longest = max(len(enc(tok, " Paris")), len(enc(tok, " Rome is")))
    assert got.prompt_ids == tuple(enc(tok, CORPUS[0])[-(5 - longest) :])
    assert all(len(got.prompt_ids) + len(c) <= 5 for c in got.candidates)


# ------------------------------------------------------------------------------------------- errors

C = {"prompt": "a", "completion": " b"}
Q = {"prompt": "a", "candidates": [" b", " c"], "answer": 1}
U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
ERRORS = [  # (records, line, field, part of the message)
    ([C, '{"prompt": "a", "completion": '], 2, "", "invalid JSON"),
    (["[1, 2]"], 1, "", "JSON object"),
    (['"text"'], 1, "", "JSON object"),
    ([C, {"prompt": "a"}], 2, "completion", "missing"),
    ([{"prompt": "a"}], 1, "completion", "missing"),
    ([{"input": "a", "output": "b"}], 1, "input", "expected one of"),
    ([C, C, {"prompt": "a", "completion": "b", "id": 3}], 3, "id", "unexpected"),
    ([{"prompt": 1, "completion": "b"}], 1, "prompt", "expected a string, got int"),
    ([{"text": None}], 1, "text", "expected a string, got null"),
    ([{"messages": "hi"}], 1, "messages", "non-empty array"),
    ([{"messages": [U, "x"]}], 1, "messages[1]", "expected an object"),
    ([{"messages": [U, {"role": "assistant", "content": 5}]}], 1, "messages[1].content", "expected a string"),
    ([{"messages": [{"content": "Hi"}, A]}], 1, "messages[0].role", "missing"),
    ([{"messages": [U, {**A, "name": "bot"}]}], 1, "messages[1].name", "unexpected"),
    ([{"messages": [U]}], 1, "messages", "no 'assistant'"),
    ([{"messages": [U, {**A, "weight": 0}]}], 1, "messages", "no 'assistant' message with weight 1"),
    ([{"messages": [{**U, "weight": 1}, A]}], 1, "messages[0].weight", "only assistant"),
    ([{"messages": [U, {**A, "weight": 0.5}]}], 1, "messages[1].weight", "expected 0"),
    ([{"messages": [U, {**A, "weight": True}]}], 1, "messages[1].weight", "expected 0"),
    ([{**Q, "prompt": ""}], 1, "prompt", "non-empty"),
    ([{**Q, "candidates": []}], 1, "candidates", "empty array"),
    ([{**Q, "candidates": " b"}], 1, "candidates", "non-empty array"),
    ([{**Q, "candidates": [" b", 7]}], 1, "candidates[1]", "expected a string"),
    ([{**Q, "candidates": [" b", ""]}], 1, "candidates[1]", "non-empty"),
    ([Q, {**Q, "answer": 2}], 2, "answer", "out of range"),
    ([{**Q, "answer": -1}], 1, "answer", "out of range"),
    ([{**Q, "answer": " d"}], 1, "answer", "not among the candidates"),
    ([{**Q, "answer": True}], 1, "answer", "integer index"),
    ([{**Q, "answer": 1.0}], 1, "answer", "integer index"),
    ([{k: v for k, v in Q.items() if k != "answer"}], 1, "answer", "missing"),
    ([C, "", {"text": "hello"}], 3, "text", "line 1"),
    ([{"text": "hello there"}, C], 2, "completion", "one kind"),
    ([C, Q], 2, "candidates", "one kind"),
    ([Q, C], 2, "completion", "one kind"),
    ([{"messages": [U, A]}, {"text": "hello there"}], 2, "text", "one kind"),
    ([{"text": "a"}], 1, "text", "no target tokens"),
    (["", "  "], 0, "", "no records"),
]


@pytest.mark.parametrize(("records", "line", "field", "part"), ERRORS)
def test_errors_name_file_line_field(tok, tmp_path, records, line, field, part):
    path = write(tmp_path, records, name="my_data.jsonl")
    with pytest.raises(ValueError) as info:
        load_dataset(path, tok, max_len=64)
    err = info.value
    assert isinstance(err, DataError)
    assert (err.file, err.line, err.field) == (str(path), line, field)
    msg = str(err)
    assert "my_data.jsonl" in msg and part in msg
    assert (f"line {line}" in msg) == (line > 0)
    assert not field or f"'{field}'" in msg


def test_error_not_utf8(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not UTF-8"):
        load_dataset(p, tok)


# ------------------------------------------------------------------------------------------- batching


def test_batch_order_epochs_and_wrap():
    n, bs = 12, 4
    first_epoch = [i for s in range(3) for i in batch_order(n, bs, seed=7, step=s)]
    assert sorted(first_epoch) == list(range(n)) and first_epoch != list(range(n))
    # 10 examples, batches of 4: step 2 holds the last two of epoch 0 and the first two of epoch 1
    flat = [i for s in range(5) for i in batch_order(10, 4, seed=3, step=s)]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh permutation per epoch
    assert all(len(batch_order(10, 4, 3, s)) == 4 for s in range(7))
    big = batch_order(3, 7, 0, 0)  # a batch larger than the dataset spans epochs 0, 1 and the start of 2
    assert sorted(big[:3]) == sorted(big[3:6]) == [0, 1, 2] and len(big) == 7


def test_batch_order_pure_and_seeded():
    ref = [batch_order(50, 8, seed=11, step=s) for s in range(20)]
    np.random.seed(123)
    torch.manual_seed(123)  # global RNGs must not matter
    again = [batch_order(50, 8, seed=11, step=s) for s in reversed(range(20))][::-1]
    assert again == ref
    for s in range(20):  # no hidden state from other calls
        batch_order(37, 5, seed=s, step=s)
    assert batch_order(50, 8, seed=11, step=13) == ref[13]
    assert [batch_order(50, 8, seed=12, step=s) for s in range(20)] != ref
    assert batch_order(50, 8, seed=2**63 + 5, step=10**9) == batch_order(50, 8, seed=2**63 + 5, step=10**9)
    with pytest.raises(ValueError):
        batch_order(0, 4, 0, 0)


def test_collate_pads():
    exs = [Example((5, 6, 7), (-100, 6, 7)), Example((8,), (-100,)), Example((1, 2), (-100, 2))]
    ids, labels, lens = collate(exs, pad_id=99)
    assert ids.dtype == labels.dtype == lens.dtype == torch.int64
    assert ids.tolist() == [[5, 6, 7], [8, 99, 99], [1, 2, 99]]
    assert labels.tolist() == [[-100, 6, 7], [-100, -100, -100], [-100, 2, -100]]
    assert lens.tolist() == [3, 1, 2]


# ------------------------------------------------------------------------------------------- losses


def _batch(b: int = 3, t: int = 9, v: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.35] = -100
    labels[0, 1] = 4  # at least one target
    return logits, labels


def test_nll_sum_matches_cross_entropy():
    logits, labels = _batch()
    flat_logits, flat_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    ref = F.cross_entropy(flat_logits, flat_labels, reduction="sum", ignore_index=-100)
    total, count = nll_sum(logits, labels)
    assert total.dtype == torch.float32 and total.ndim == 0
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean_loss(logits, labels), ref / count, rtol=1e-6, atol=0)
    for chunk in (1, 2, 5, 1000):
        torch.testing.assert_close(nll_sum(logits, labels, chunk_rows=chunk)[0], total, rtol=1e-6, atol=0)


def test_rows_nll_gathers_repeated_rows_like_cross_entropy():
    """rows_nll over gathered (repeated) rows, any chunking, against F.cross_entropy per row."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 37, generator=g) * 3).to(torch.bfloat16)
    rows = torch.tensor([0, 0, 2, 4, 4, 4, 1])
    targets = torch.randint(0, 37, (7,), generator=g)
    ref = F.cross_entropy(logits.float()[rows], targets, reduction="none")
    for chunk in (1, 3, 8, 100):
        got = rows_nll(logits, targets, chunk_rows=chunk, rows=rows)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(rows_nll(logits[rows], targets, chunk_rows=2), ref, rtol=1e-6, atol=0)


def test_nll_sum_half_precision_in_fp32():
    logits, labels = _batch(seed=1)
    half = logits.to(torch.bfloat16)
    ref = F.cross_entropy(half[:, :-1].float().reshape(-1, 37), labels[:, 1:].reshape(-1), reduction="sum")
    total, _ = nll_sum(half, labels, chunk_rows=4)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=0)


def test_no_targets():
    logits = torch.randn(2, 4, 5)
    labels = torch.full((2, 4), -100)
    labels[1, 0] = 3  # position 0 is never predicted
    total, count = nll_sum(logits, labels)
    assert count == 0 and total.item() == 0.0
    with pytest.raises(ValueError, match="no target"):
        mean_loss(logits, labels)


def test_choice_scores_by_mean_logprob(tok):
    ch = ChoiceExample(prompt_ids=(3, 9, 4), candidates=((7,), (8, 2, 6), (5, 5)), answer=1)
    ids, labels, _ = collate(choice_batches(ch), pad_id=0)
    logits = torch.randn(3, ids.shape[1], 12, generator=torch.Generator().manual_seed(4))
    sums, counts = nll_per_example(logits, labels)
    assert counts.tolist() == [1, 3, 2]
    for b, cand in enumerate(ch.candidates):  # textbook loop: token k of the candidate is at 3 + k
        logp = torch.log_softmax(logits[b].double(), -1)
        lp = [logp[2 + k, tok_id].item() for k, tok_id in enumerate(cand)]
        assert -sums[b].item() / counts[b].item() == pytest.approx(sum(lp) / len(lp), rel=1e-6)


def test_choice_accuracy():
    scores = [[0.1, 0.5], [0.3, 0.2, -1.0], [math.nan, 0.0], [2.0, 2.0]]
    assert choice_accuracy(scores, [1, 0, 1, 0]) == 1.0
    assert choice_accuracy(scores, [0, 0, 0, 1]) == 0.25
    with pytest.raises(ValueError):
        choice_accuracy(scores, [0])
