"""A four-topic headline task in {"prompt","candidates","answer"} form, generated deterministically.

The second bench task of bench/finetune.py, worded unlike bench/sentiment_task.py: a news headline
composed from per-topic actors and events plus a shared time phrase, and a question with four lettered
options (letters, so the label words' meaning cannot be leaned on). Train and held-out sets share no
headline. `python bench/topic_task.py OUTDIR [--train N] [--eval N] [--seed S]`.
"""

from __future__ import annotations

import random

from sentiment_task import write_task  # same folder: these run as scripts

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
    write_task(make, __doc__)


if __name__ == "__main__":
    main()
