"""A bag-of-words probe on the demo's preference pairs: the bar a transformer reward model should clear.

Logistic regression on word counts, trained pairwise (score(chosen) - score(rejected)) on
`reward_train` and measured on `reward_eval`, exactly the pairs the reward stage trains and is
measured on. Prints the probe's held-out pairwise accuracy for the config's `movie_reviews` recipe:

    python bench/reward_probe.py configs/demo.yaml [movie_reviews.reward_words=64 ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import movie_reviews  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation.guards import words  # noqa: E402

MIN_COUNT = 2  # words seen fewer times in training are dropped
EPOCHS = 30
L2 = 1e-4


def features(texts: list[str], vocab: dict[str, int]) -> torch.Tensor:
    x = torch.zeros(len(texts), len(vocab))
    for i, t in enumerate(texts):
        for w, c in Counter(words(t)).items():
            if w in vocab:
                x[i, vocab[w]] = c
    return torch.log1p(x)


def fit_probe(train: list[dict], seed: int = 0) -> tuple[dict[str, int], torch.Tensor]:
    """(vocabulary, weights) of the pairwise logistic regression on word counts."""
    counts = Counter(w for row in train for key in ("chosen", "rejected") for w in words(row[key]))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= MIN_COUNT))}
    diff = features([r["chosen"] for r in train], vocab) - features([r["rejected"] for r in train], vocab)
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


def probe_scores(texts: list[str], vocab: dict[str, int], weights: torch.Tensor) -> list[float]:
    return (features(texts, vocab) @ weights).tolist()


def probe_accuracy(train: list[dict], held_out: list[dict], seed: int = 0) -> float:
    vocab, weights = fit_probe(train, seed)
    test = features([r["chosen"] for r in held_out], vocab) - features([r["rejected"] for r in held_out], vocab)
    return float(((test @ weights) > 0).float().mean())


def main(argv: list[str]) -> None:
    cfg = load_config(argv[0], argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        out = movie_reviews.prepare(cfg.movie_reviews, Path(tmp))
        rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()]
                for s in ("reward_train", "reward_eval")}
    accuracy = probe_accuracy(rows["reward_train"], rows["reward_eval"])
    print(json.dumps({"reward_words": cfg.movie_reviews.reward_words, "train_pairs": len(rows["reward_train"]),
                      "eval_pairs": len(rows["reward_eval"]), "bag_of_words_accuracy": round(accuracy, 4)}))


if __name__ == "__main__":
    main(sys.argv[1:])
