"""A bag-of-words probe on the demo's preference pairs: the bar a transformer reward model should clear.

Logistic regression on word counts, trained pairwise (score(chosen) - score(rejected)) on
`reward_train` and measured on `reward_eval`, exactly the pairs the reward stage trains and is
measured on. Prints the probe's held-out pairwise accuracy for the config's `movie_reviews` recipe:

    python bench/reward_probe.py configs/demo.yaml [movie_reviews.reward_words=64 ...]
    python bench/reward_probe.py configs/demo.yaml --select 500 --vocab-sizes 4096,8192
    python bench/reward_probe.py configs/demo.yaml --tokenizer runs/demo/pretrain/final

`--vocab-sizes` also fits the probe on the token ids of byte-level BPE tokenizers of those sizes, trained
on `pretrain_train` as the pretrain stage trains the demo's; `--tokenizer` on a saved tokenizer's ids:
what the reward model's input units give a linear reader. `--select N` scores the first windows of the
last N training review pairs instead of `reward_eval`, training without any window of them (the
selection split of `reward_variants.py`), so that a setting is not chosen on the pairs it is reported on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import movie_reviews  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation.guards import words  # noqa: E402

MIN_COUNT = 2  # words seen fewer times in training are dropped
EPOCHS = 30
L2 = 1e-4


Split = Callable[[str], list[str]]


def features(texts: list[str], vocab: dict[str, int], split: Split = words) -> torch.Tensor:
    """log(1 + count) of each vocabulary unit (a word by default) in each text."""
    x = torch.zeros(len(texts), len(vocab))
    for i, t in enumerate(texts):
        for w, c in Counter(split(t)).items():
            if w in vocab:
                x[i, vocab[w]] = c
    return torch.log1p(x)


def fit_probe(train: list[dict], seed: int = 0, split: Split = words) -> tuple[dict[str, int], torch.Tensor]:
    """(vocabulary, weights) of the pairwise logistic regression on word (or `split`'s unit) counts."""
    counts = Counter(w for row in train for key in ("chosen", "rejected") for w in split(row[key]))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= MIN_COUNT))}
    diff = (features([r["chosen"] for r in train], vocab, split)
            - features([r["rejected"] for r in train], vocab, split))
    torch.manual_seed(seed)
    weights = torch.zeros(len(vocab), requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.05)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(diff)).split(256):
            loss = torch.nn.functional.softplus(-(diff[idx] @ weights)).mean() + L2 * weights.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return vocab, weights.detach()


def probe_scores(texts: list[str], vocab: dict[str, int], weights: torch.Tensor, split: Split = words) -> list[float]:
    return (features(texts, vocab, split) @ weights).tolist()


def probe_accuracy(train: list[dict], held_out: list[dict], seed: int = 0, split: Split = words) -> float:
    vocab, weights = fit_probe(train, seed, split)
    test = (features([r["chosen"] for r in held_out], vocab, split)
            - features([r["rejected"] for r in held_out], vocab, split))
    return float(((test @ weights) > 0).float().mean())


def token_split(tokenizer) -> Split:
    """A text's units as the tokenizer's ids (as strings), without special tokens: what a model reads."""
    return lambda text: [str(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--select", type=int, help="score the last N training review pairs' first windows instead")
    p.add_argument("--vocab-sizes", default="", help="comma-separated BPE sizes to fit the probe on as well")
    p.add_argument("--tokenizer", type=Path, help="a saved tokenizer's dir to fit the probe on as well")
    a = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    cfg = load_config(a.config, a.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = movie_reviews.prepare(cfg.movie_reviews, Path(tmp))
        rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()]
                for s in ("reward_train", "reward_eval") + (("pretrain_train",) if a.vocab_sizes else ())}
    train, held_out = rows["reward_train"], rows["reward_eval"]
    if a.select:
        from bench.reward_variants import select_split

        train, held_out = select_split(train, cfg.movie_reviews.reward_pairs, a.select)
    splits: dict[str, Split] = {"words": words}
    if a.tokenizer:
        from transformers import AutoTokenizer

        splits[f"tokens of {a.tokenizer}"] = token_split(AutoTokenizer.from_pretrained(a.tokenizer))
    if a.vocab_sizes:
        from pipeline.models import train_tokenizer

        texts = [r["text"] for r in rows["pretrain_train"]]
        for size in (int(v) for v in a.vocab_sizes.split(",")):
            splits[f"tokens of a {size} BPE"] = token_split(train_tokenizer(texts, size))
    accuracy = {unit: round(probe_accuracy(train, held_out, split=split), 4) for unit, split in splits.items()}
    print(json.dumps({"reward_words": cfg.movie_reviews.reward_words, "train_pairs": len(train),
                      "eval_pairs": len(held_out), "held_out": f"selection ({a.select})" if a.select else "reward_eval",
                      "bag_of_words_accuracy": accuracy.pop("words"), "bag_of_tokens_accuracy": accuracy}))


if __name__ == "__main__":
    main(sys.argv[1:])
