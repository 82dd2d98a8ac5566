"""A small sentiment task in {"prompt","candidates","answer"} form, generated deterministically.

Reviews are composed from templates (subject, positive/negative detail, closing remark) so
the train and held-out sets share no sentence. Used by the README's real fine-tune and by
`bench/demo.sh`: `python bench/sentiment_task.py OUTDIR [--train N] [--eval N] [--seed S]`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SUBJECTS = [
    "The pasta",
    "This phone",
    "The hotel room",
    "The movie",
    "Our waiter",
    "The laptop battery",
    "The concert",
    "This novel",
    "The delivery",
    "The coffee",
    "The checkout process",
    "The headphones",
    "The museum tour",
    "The rental car",
    "The pizza crust",
    "This game",
    "The support team",
    "The bike",
    "The soundtrack",
    "The mattress",
]
GOOD = [
    "was wonderful",
    "exceeded every expectation",
    "felt fresh and delightful",
    "worked flawlessly",
    "was a pleasure from start to finish",
    "made my whole week",
    "was friendly and fast",
    "was worth every penny",
    "surprised me in the best way",
    "was simply excellent",
]
BAD = [
    "was a huge disappointment",
    "broke after two days",
    "was cold and bland",
    "wasted my evening",
    "was rude and slow",
    "felt cheap and flimsy",
    "was a complete mess",
    "left me angry",
    "was not worth the money",
    "stopped working immediately",
]
GOOD_END = ["I would gladly come back.", "Highly recommended.", "Five stars.", "I will buy it again."]
BAD_END = ["Never again.", "I asked for a refund.", "Avoid it.", "One star is too many."]
# Letters, not words: the base model cannot lean on the label words' meaning (it scores ~50%
# zero-shot), so what the fine-tune learns is visible in the held-out accuracy.
QUESTION = "Is this review positive (A) or negative (B)? Answer:"
LABELS = [" A", " B"]


def make(n: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    out: list[dict] = []
    while len(out) < n:
        positive = rng.random() < 0.5
        text = f"{rng.choice(SUBJECTS)} {rng.choice(GOOD if positive else BAD)}. " + rng.choice(
            GOOD_END if positive else BAD_END
        )
        if text in exclude:
            continue
        exclude.add(text)
        out.append(
            {"prompt": f"Review: {text}\n{QUESTION}", "candidates": LABELS, "answer": 0 if positive else 1}
        )
    return out


def write_task(make_rows: Callable[[int, random.Random, set[str]], list[dict]], doc: str | None) -> None:
    """The command line of a generated task: OUTDIR/train.jsonl and OUTDIR/eval.jsonl, disjoint rows."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng, seen = random.Random(a.seed), set()
    a.out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", a.train), ("eval", a.eval)):
        rows = make_rows(n, rng, seen)
        (a.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(a.out)


def main() -> None:
    write_task(make, __doc__)


if __name__ == "__main__":
    main()
