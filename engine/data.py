"""Fine-tuning data: JSONL records → token examples with loss masks.
(Batch order and collation: engine/batching.py; the token NLL they are scored by: engine/losses.py.)

Four record kinds, one per file, detected from the first record and checked on every line:
  completion  {"prompt": str, "completion": str}        loss on completion tokens (+ EOS)
  text        {"text": str}                             loss on every token after the first
  chat        {"messages": [{"role", "content"}, ...]}  loss on assistant turns (content + end marker)
  choice      {"prompt": str, "candidates": [str], "answer": int | str}
              train on prompt + correct candidate; evaluate by length-normalised log-likelihood.
Labels follow the HF convention: labels[i] = input_ids[i] where token i is a target, else -100;
the logits at position i-1 predict token i.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError

KINDS = ("completion", "text", "chat", "choice")
IGNORE = -100
_KEYS = {
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "chat": ("messages",),
    "choice": ("prompt", "candidates", "answer"),
}
_FORMATS = (
    '{"prompt": str, "completion": str} | {"text": str} | {"messages": [{"role": str, "content": str}]} '
    '| {"prompt": str, "candidates": [str], "answer": int | str}'
)


class DataError(RequestError):
    """A bad dataset record. The message names the source, the 1-based line (0: whole file) and field."""

    def __init__(self, file: str, line: int, field: str, what: str) -> None:
        where = file + (f" line {line}" if line else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {what}", field=field)
        self.file, self.line = file, line

    def __str__(self) -> str:  # the message already names the field; RequestError would prefix it again
        return self.args[0]


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # same length; IGNORE where token i is not a target


@dataclass(frozen=True)
class ChoiceExample:
    prompt_ids: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    answer: int


@dataclass
class Dataset:
    kind: str
    examples: list[Example]
    choices: list[ChoiceExample] = field(default_factory=list)  # non-empty only for kind "choice"
    path: str = ""


# ---------------------------------------------------------------------------------------------- loading


def load_dataset(path: str | os.PathLike, tokenizer: Any, max_len: int = 1024) -> Dataset:
    """Read a JSONL file (blank lines ignored) into a Dataset; raises DataError naming file/line/field."""
    with open(path, "rb") as f:
        return load_records(f, os.fspath(path), tokenizer, max_len)


MAX_NESTING = 64  # JSON depth a record may have; deeper ones are refused before parsing
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def too_deep(text: str) -> bool:
    """Whether a line's JSON nests past MAX_NESTING (brackets inside strings do not count). json.loads
    refuses such input only at Python's recursion limit, where the collector's finalizers that happen
    to run fail too."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_NESTING:
            return True
    return False


def load_records(lines: Iterable[str | bytes], source: str, tokenizer: Any, max_len: int = 1024) -> Dataset:
    """Same as load_dataset for lines from elsewhere (e.g. uploaded over the API); `source` names them."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one context token and one target), got {max_len}")
    ctx = _Ctx(source, tokenizer, max_len)
    kind: str | None = None
    first_line = 0
    examples: list[Example] = []
    choices: list[ChoiceExample] = []
    for lineno, raw in enumerate(lines, start=1):
        ctx.line = lineno
        text = _decode_line(raw, ctx)
        if not text.strip():
            continue
        if too_deep(text):  # before json.loads: its recursion would run near the stack limit
            raise ctx.error("", f"JSON nested more than {MAX_NESTING} levels deep; records are flat objects")
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            what = f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
            raise ctx.error("", what) from None
        if not isinstance(rec, dict):
            raise ctx.error("", f"expected a JSON object per line, got {_typename(rec)}")
        kind = _check_keys(rec, kind, first_line, ctx)
        first_line = first_line or lineno
        if kind == "choice":
            ch = _choice(rec, ctx)
            choices.append(ch)
            examples.append(choice_batches(ch)[ch.answer])
        else:
            examples.append(_fit(*_BUILDERS[kind](rec, ctx), _KEYS[kind][-1], ctx))
    if kind is None:
        ctx.line = 0
        raise ctx.error("", "no records (empty or only blank lines); expected one JSON object per line")
    return Dataset(kind=kind, examples=examples, choices=choices, path=source)


class _Ctx:
    """Where we are (for error messages) and the tokenizer facts every record needs."""

    def __init__(self, source: str, tokenizer: Any, max_len: int) -> None:
        self.source, self.tok, self.max_len, self.line = source, tokenizer, max_len, 0
        self.eos: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.prefix = _special_prefix(tokenizer)

    def error(self, field_name: str, what: str) -> DataError:
        return DataError(self.source, self.line, field_name, what)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before a text by default (BOS for Llama, </s> for OPT, none for ChatML)."""
    bare = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x")["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i]
    return []


def _decode_line(raw: str | bytes, ctx: _Ctx) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8-sig" if ctx.line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ctx.error("", f"not UTF-8 text (byte {e.start}); expected UTF-8 JSONL") from None


def _kind_of(keys: set[str]) -> str | None:
    if "messages" in keys:
        return "chat"
    if "candidates" in keys or "answer" in keys:
        return "choice"
    if "completion" in keys:
        return "completion"
    return "text" if "text" in keys else None


def _check_keys(rec: dict[str, Any], kind: str | None, first_line: int, ctx: _Ctx) -> str:
    """The record's kind; it must be the file's kind (set by the first record) with exactly its keys."""
    keys = set(rec)
    found = _kind_of(keys)
    if kind is None:
        if found is None:
            if "prompt" in keys:
                what = f"missing (or 'candidates' and 'answer'); expected one of {_FORMATS}"
                raise ctx.error("completion", what)
            name = sorted(keys)[0] if keys else ""
            raise ctx.error(
                name, f"{'not a known record field' if keys else 'empty object'}; expected one of {_FORMATS}"
            )
        kind = found
    required = _KEYS[kind]
    missing = [k for k in required if k not in keys]
    if found is not None and found != kind and missing:
        marker = next(k for k in ("messages", "candidates", "answer", "completion", "text") if k in keys)
        raise ctx.error(
            marker,
            f"a {found} record in a file of {kind} records (from line {first_line}); one file holds one kind",
        )
    if missing:
        raise ctx.error(missing[0], f"missing; a {kind} record has exactly {_keylist(kind)}")
    extra = sorted(keys - set(required))
    if extra:
        raise ctx.error(extra[0], f"unexpected; a {kind} record has exactly {_keylist(kind)}")
    return kind


def _keylist(kind: str) -> str:
    return ", ".join(repr(k) for k in _KEYS[kind])


def _str(rec: dict[str, Any], key: str, ctx: _Ctx, name: str | None = None) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise ctx.error(name or key, f"expected a string, got {_typename(v)}")
    return v


def _typename(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "array"}.get(type(v), type(v).__name__)


def _completion(rec: dict[str, Any], ctx: _Ctx) -> tuple[list[int], list[int]]:
    prompt = ctx.prefix + ctx.encode(_str(rec, "prompt", ctx))
    target = ctx.encode(_str(rec, "completion", ctx)) + ctx.eos
    return prompt + target, [IGNORE] * len(prompt) + target


def _text(rec: dict[str, Any], ctx: _Ctx) -> tuple[list[int], list[int]]:
    ids = ctx.prefix + ctx.encode(_str(rec, "text", ctx))
    return ids, list(ids)  # _fit masks position 0


def _chat(rec: dict[str, Any], ctx: _Ctx) -> tuple[list[int], list[int]]:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ctx.error("messages", f"expected a non-empty array of messages, got {_typename(msgs)}")
    for i, m in enumerate(msgs):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ctx.error(name, f"expected an object {{'role': str, 'content': str}}, got {_typename(m)}")
        for k in ("role", "content"):
            if k not in m:
                raise ctx.error(f"{name}.{k}", "missing; a message has exactly 'role', 'content'")
            _str(m, k, ctx, f"{name}.{k}")
        if extra := sorted(set(m) - {"role", "content", "weight"}):
            what = "unexpected; a message has 'role', 'content' and (assistant turns) an optional 'weight'"
            raise ctx.error(f"{name}.{extra[0]}", what)
        if "weight" in m:  # OpenAI's chat fine-tuning format: weight 0 = an assistant turn not trained on
            if m["role"] != "assistant":
                raise ctx.error(f"{name}.weight", "only assistant messages take a weight")
            if type(m["weight"]) is not int or m["weight"] not in (0, 1):
                raise ctx.error(f"{name}.weight", f"expected 0 (not trained on) or 1, got {m['weight']!r}")
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in msgs):
        raise ctx.error("messages", "no 'assistant' message with weight 1: nothing to train on")
    if not getattr(ctx.tok, "chat_template", None):
        raise ctx.error("messages", "the model's tokenizer has no chat_template; use completion records")
    # Render each prefix and cut the text into alternating context / assistant segments; tokenising the
    # segments separately makes the mask exact and matches generation (prompt, then generated tokens).
    ids: list[int] = []
    labels: list[int] = []
    seen = ""  # rendered text already tokenised
    eos_text = ctx.tok.eos_token or ""
    weights = [m.get("weight", 1) for m in msgs]
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]  # what the template renders
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or weights[i] == 0:  # a weight-0 turn is context for the next one
            continue
        before = _render(msgs[:i], True, ctx)
        upto = _render(msgs[: i + 1], False, ctx)
        if not upto.startswith(before) or not before.startswith(seen):
            what = "the chat template renders conversation prefixes inconsistently; use completion records"
            raise ctx.error(f"messages[{i}]", what)
        turn = upto[len(before) :]
        if eos_text and eos_text in turn:  # train up to the end marker, not the separator after it
            turn = turn[: turn.rindex(eos_text) + len(eos_text)]
        context = ctx.encode(before[len(seen) :])
        target = ctx.encode(turn)
        ids += context + target
        labels += [IGNORE] * len(context) + target
        seen = before + turn
    return ids, labels  # what follows the last assistant turn has no targets: dropped


def _render(msgs: list[dict[str, Any]], generation_prompt: bool, ctx: _Ctx) -> str:
    try:
        out = ctx.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raise_exception(), bad roles, ...
        raise ctx.error("messages", f"the chat template rejected the conversation: {e}") from None
    return str(out)


_BUILDERS = {"completion": _completion, "text": _text, "chat": _chat}


def _fit(ids: list[int], labels: list[int], target_field: str, ctx: _Ctx) -> Example:
    """Truncate to max_len: drop context from the left (keeping one token before the first target),
    then cut from the right. Position 0 is never a target (nothing predicts it)."""
    labels = [IGNORE, *labels[1:]] if labels else labels
    first = next((i for i, t in enumerate(labels) if t != IGNORE), None)
    if first is None:
        raise ctx.error(target_field, "yields no target tokens to train on; expected non-empty text")
    if len(ids) > ctx.max_len:
        drop = min(len(ids) - ctx.max_len, first - 1)
        ids, labels = ids[drop : drop + ctx.max_len], labels[drop : drop + ctx.max_len]
    return Example(tuple(ids), tuple(labels))


def _choice(rec: dict[str, Any], ctx: _Ctx) -> ChoiceExample:
    prompt = ctx.prefix + ctx.encode(_str(rec, "prompt", ctx))
    if not prompt:
        raise ctx.error("prompt", "expected a non-empty string (the candidates are scored given it)")
    cands = rec["candidates"]
    if not isinstance(cands, list) or not cands:
        got = "an empty array" if isinstance(cands, list) else _typename(cands)
        raise ctx.error("candidates", f"expected a non-empty array of strings, got {got}")
    texts = [_str({"c": c}, "c", ctx, f"candidates[{i}]") for i, c in enumerate(cands)]
    tokens = []
    for i, t in enumerate(texts):
        c = ctx.encode(t)[: ctx.max_len - 1]  # keep room for one prompt token
        if not c:
            raise ctx.error(f"candidates[{i}]", "expected a non-empty string")
        tokens.append(tuple(c))
    answer = rec["answer"]
    if isinstance(answer, str):
        if answer not in texts:
            what = f"{answer!r} is not among the candidates; expected an index or a candidate string"
            raise ctx.error("answer", what)
        answer = texts.index(answer)
    elif not isinstance(answer, int) or isinstance(answer, bool):
        raise ctx.error("answer", f"expected an integer index or a candidate string, got {_typename(answer)}")
    elif not 0 <= answer < len(texts):
        raise ctx.error("answer", f"index {answer} out of range; expected 0..{len(texts) - 1}")
    room = ctx.max_len - max(len(c) for c in tokens)  # left-truncate the prompt so every candidate fits
    return ChoiceExample(tuple(prompt[-room:]), tuple(tokens), answer)


def choice_batches(ex: ChoiceExample) -> list[Example]:
    """One Example per candidate (prompt + candidate, targets on the candidate) for scoring."""
    p = ex.prompt_ids
    return [Example(p + c, (IGNORE,) * len(p) + c) for c in ex.candidates]


def choice_accuracy(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Fraction of questions whose best-scoring candidate (first on ties; NaN never wins) is the answer."""
    if len(scores) != len(answers):
        raise ValueError(f"got {len(scores)} score rows for {len(answers)} answers")
    if not scores:
        raise ValueError("no questions to score")
    hits = 0
    for row, ans in zip(scores, answers, strict=True):
        vals = [float("-inf") if s != s else float(s) for s in row]
        hits += max(range(len(vals)), key=vals.__getitem__) == ans
    return hits / len(scores)
