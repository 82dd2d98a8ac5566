"""A four-topic headline task in {"prompt","candidates","answer"} form, generated deterministically.

The second bench task of bench/finetune.py, worded unlike bench/sentiment_task.py: a news headline
composed from per-topic actors and events plus a shared time phrase, and a question with four lettered
options (letters, so the label words' meaning cannot be leaned on). Train and held-out sets share no
headline. `python bench/topic_task.py OUTDIR [--train N] [--eval N] [--seed S]`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = {
    "sports": (
        ["The home team", "A veteran striker", "The national squad", "Their goalkeeper", "A rookie sprinter"],
        [
            "wins the championship final",
            "breaks the league scoring record",
            "is injured before the playoffs",
            "signs a transfer deal",
            "takes gold in the relay",
            "loses on penalties",
        ],
    ),
    "business": (
        ["The retail giant", "A small bank", "The car maker", "Shareholders", "The startup"],
        [
            "reports record quarterly profits",
            "announces a merger",
            "cuts two thousand jobs",
            "raises prices on its goods",
            "files for bankruptcy",
            "sees its stock fall sharply",
        ],
    ),
    "science": (
        ["Astronomers", "A research lab", "Marine biologists", "Physicists", "The space agency"],
        [
            "discover a new exoplanet",
            "sequence an ancient genome",
            "observe a rare particle decay",
            "map the ocean floor",
            "launch a probe to Jupiter",
            "find a new species of frog",
        ],
    ),
    "entertainment": (
        ["The pop star", "A famous director", "The sitcom cast", "The band", "An award-winning actor"],
        [
            "releases a surprise album",
            "premieres a new film",
            "tops the streaming charts",
            "announces a world tour",
            "wins best actor",
            "reunites for a final season",
        ],
    ),
}
WHEN = ["this week", "on Monday", "after months of rumours", "overnight", "despite the critics", "again"]
QUESTION = (
    "Which section does this headline belong to? "
    "(A) sports (B) business (C) science (D) entertainment\nAnswer:"
)
LABELS = [" A", " B", " C", " D"]


def make(n: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    out: list[dict] = []
    names = list(TOPICS)
    while len(out) < n:
        k = rng.randrange(len(names))
        who, what = TOPICS[names[k]]
        text = f"{rng.choice(who)} {rng.choice(what)} {rng.choice(WHEN)}."
        if text in exclude:
            continue
        exclude.add(text)
        out.append({"prompt": f"Headline: {text}\n{QUESTION}", "candidates": LABELS, "answer": k})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng, seen = random.Random(a.seed), set()
    a.out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", a.train), ("eval", a.eval)):
        rows = make(n, rng, seen)
        (a.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(a.out)


if __name__ == "__main__":
    main()
