"""Reward-model variants on a demo run's SFT policy: what moves held-out pairwise accuracy.

The reward stage trains with TRL's RewardTrainer, which reads the score at the last token. This
script trains the same pairwise objective, -log sigmoid(r_chosen - r_rejected), in a plain loop so
that variants TRL does not offer can be measured beside it on the run's own pairs:

    python bench/reward_variants.py RUN_DIR                          # the stage's recipe: last token, 250 x 32
    python bench/reward_variants.py RUN_DIR --steps 750 --lr 7e-4    # longer
    python bench/reward_variants.py RUN_DIR --readout mean           # mean of every token's score
    python bench/reward_variants.py RUN_DIR --token-loss 1.0         # plus each response token's score vs the label
    python bench/reward_variants.py RUN_DIR --train other/reward_train.jsonl   # more pairs (same held-out pairs)
    python bench/reward_variants.py RUN_DIR --reward-pairs 11500 --select 500  # more review pairs; choose on 500 of them
    python bench/reward_variants.py RUN_DIR --word-dropout 0.15 --crop-min 16  # responses thinned and cut anew each draw
    python bench/reward_variants.py RUN_DIR --seed 1 --save DIR      # another seed, kept for an ensemble or best_of_n
    python bench/reward_variants.py RUN_DIR --select 500 --short-pairs 12     # plus pairs of short labelled reviews

It starts from RUN_DIR/sft/final with a new one-output head, as the stage does, and prints the
held-out accuracy on RUN_DIR/data/movie-reviews/reward_eval.jsonl every 50 steps, with the
bag-of-words probe's accuracy on the same training and held-out pairs (bench/reward_probe.py).
`--select N` holds out the last N review pairs of the training pairs instead (every window of them out
of training, their first windows as the held-out pairs), so that settings are chosen there and only
reported on reward_eval (`--select N --report`: the same training, scored on reward_eval).
`--reward-pairs R` rebuilds the run's movie-reviews recipe with R review pairs (the splits after
reward_train shrunk to one review; reward_eval does not move). `--init pretrain` starts from the run's
pretrained model instead of its SFT policy. `--short-pairs W` adds a pair for each positive and negative
review of fewer than the recipe's min_words words but at least W (Rotten Tomatoes' one-sentence reviews,
which the demo only pretrains on), split as the recipe splits a review: its first prompt_words words open
the prompt, the rest is the response. `--out FILE` writes the curve as JSON. It measures; it
changes nothing in the run dir.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reward_probe import probe_accuracy  # noqa: E402

WARMUP = 10
RESPONSE_FROM = 16  # tokens: the token loss skips the instruction and most of the 8-word opening


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select_split(rows: list[dict], window0: int, n: int) -> tuple[list[dict], list[dict]]:
    """Hold out the last `n` review pairs: (training rows without any window of them, their first windows).
    The pairs' first windows are the first `window0` rows, later windows follow; a pair's rows share its prompt."""
    held = {r["prompt"] for r in rows[window0 - n : window0]}
    return [r for r in rows if r["prompt"] not in held], [r for r in rows[:window0] if r["prompt"] in held]


def recipe_pairs(data: Path, reward_pairs: int | None) -> tuple[list[dict], int]:
    """(reward_train rows, review pairs) of the run's recipe, rebuilt with `reward_pairs` if given."""
    import dataclasses

    from pipeline.config import MovieReviewsSection
    from pipeline.movie_reviews import build_splits

    recipe = json.loads((data / "recipe.json").read_text())["recipe"]
    if reward_pairs is None:
        return read_rows(data / "reward_train.jsonl"), recipe["reward_pairs"]
    cfg = dataclasses.replace(MovieReviewsSection(**recipe), reward_pairs=reward_pairs, sft_examples=1,
                              sft_eval_examples=1, eval_text_docs=1)
    splits = build_splits(cfg)
    assert splits["reward_eval"] == read_rows(data / "reward_eval.jsonl"), "reward_eval must not move with reward_pairs"
    return splits["reward_train"], reward_pairs


def short_review_pairs(reviews, recipe: dict, min_words: int, exclude: set[str], seed: int = 0) -> list[dict]:
    """Preference pairs from the short labelled reviews (fewer than recipe["min_words"] words, at least `min_words`)
    that are not in `exclude`: chosen the rest of a positive one after its opening, rejected a negative one's,
    the prompt from the positive review on even pairs and from the negative one on odd, as the recipe pairs."""
    short = [r for r in reviews if min_words <= len(r.text.split()) < recipe["min_words"] and r.text not in exclude]
    random.Random(seed).shuffle(short)
    positive, negative = [r for r in short if r.label == 1], [r for r in short if r.label == 0]
    n, rows = recipe["prompt_words"], []
    for i, (p, q) in enumerate(zip(positive, negative)):
        p_words, q_words = p.text.split(), q.text.split()
        opening = " ".join((p_words if i % 2 == 0 else q_words)[:n])
        rows.append({"prompt": f"{recipe['instruction']} {opening}", "chosen": " ".join(p_words[n:]),
                     "rejected": " ".join(q_words[n:])})
    return rows


def encode_rows(tokenizer, rows: list[dict], max_length: int) -> list[tuple[dict, tuple[list[int], list[int]]]]:
    """(row, (chosen ids, rejected ids)) through the chat template, as the reward stage gives them to TRL, for the
    rows whose both sides fit max_length."""
    def ids(row: dict, key: str) -> list[int]:
        turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[key]}]
        return list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False))

    encoded = ((row, (ids(row, "chosen"), ids(row, "rejected"))) for row in rows)
    return [(row, (c, r)) for row, (c, r) in encoded if len(c) <= max_length and len(r) <= max_length]


def encode(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of the rows that fit max_length (`encode_rows` without the rows)."""
    return [pair for _, pair in encode_rows(tokenizer, rows, max_length)]


def augmented(row: dict, word_dropout: float, crop_min: int, rng: random.Random) -> dict:
    """The pair with each response cut to a random run of >= crop_min words and thinned by word dropout."""
    def thin(text: str) -> str:
        words = text.split()
        if crop_min and len(words) > crop_min:
            size = rng.randint(crop_min, len(words))
            start = rng.randint(0, len(words) - size)
            words = words[start : start + size]
        kept = [w for w in words if rng.random() >= word_dropout]
        return " ".join(kept or words[:1])
    return {"prompt": row["prompt"], "chosen": thin(row["chosen"]), "rejected": thin(row["rejected"])}


def token_scores(model, seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's score (batch, width) and the padding mask, right-padded."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.score(hidden)[..., 0], mask


def pooled(scores: torch.Tensor, mask: torch.Tensor, readout: str) -> torch.Tensor:
    if readout == "mean":
        return (scores * mask).sum(1) / mask.sum(1)
    return scores[torch.arange(len(scores)), mask.sum(1) - 1]  # last token: what the HF classifier reads


def margins(model, pairs, pad_id: int, readout: str) -> torch.Tensor:
    """Each held-out pair's score margin, chosen minus rejected."""
    model.eval()
    with torch.no_grad():
        chosen, rejected = (torch.cat([pooled(*token_scores(model, [p[side] for p in pairs[i : i + 64]], pad_id), readout)
                                       for i in range(0, len(pairs), 64)]) for side in (0, 1))
    model.train()
    return chosen - rejected


def accuracy(model, pairs, pad_id: int, readout: str) -> float:
    """The reward stage's own held-out accuracy (stages.reward.pairwise_metrics) under this readout."""
    from stages.reward import pairwise_metrics

    margin = margins(model, pairs, pad_id, readout)
    return pairwise_metrics(margin, torch.zeros_like(margin))["eval_accuracy"]


def main(argv: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--train", type=Path, help="reward_train JSONL (default: the run's)")
    p.add_argument("--eval", type=Path, help="held-out pairs JSONL (default: the run's reward_eval)")
    p.add_argument("--reward-pairs", type=int, help="review pairs for training (default: the run's recipe)")
    p.add_argument("--select", type=int, help="hold out the last N training review pairs as the held-out pairs")
    p.add_argument("--report", action="store_true",
                   help="with --select: train without the selection pairs but score reward_eval")
    p.add_argument("--init", default="sft", choices=("sft", "pretrain"),
                   help="start from the run's SFT policy (as the stage does) or its pretrained model")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--readout", choices=("last", "mean"), default="last")
    p.add_argument("--token-loss", type=float, default=0.0,
                   help="weight of a per-token loss: every response token's score against the pair's label")
    p.add_argument("--word-dropout", type=float, default=0.0,
                   help="drop each response word with this probability, anew each time a pair is drawn")
    p.add_argument("--crop-min", type=int, default=0,
                   help="train on a random run of at least this many of each response's words, anew each draw")
    p.add_argument("--short-pairs", type=int, metavar="W",
                   help="add pairs of the short labelled reviews of at least W words (not the run's held-out text)")
    p.add_argument("--embed-dropout", type=float, default=0.0, help="dropout on the token embeddings in training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--save", type=Path, help="save the trained reward model (and tokenizer) here")
    a = p.parse_args(argv)
    if a.train and (a.select or a.reward_pairs):
        p.error("--select and --reward-pairs work on the run's recipe, not on a --train file")
    if a.report and not a.select:
        p.error("--report goes with --select")

    torch.manual_seed(a.seed)
    data = a.run_dir / "data" / "movie-reviews"
    eval_rows = read_rows(a.eval or data / "reward_eval.jsonl")
    if a.train:
        train_rows = read_rows(a.train)
    else:
        train_rows, pairs = recipe_pairs(data, a.reward_pairs)
    if a.select:
        train_rows, selected = select_split(train_rows, pairs, a.select)
        eval_rows = eval_rows if a.report else selected
    if a.short_pairs:
        from pipeline.movie_reviews import load_reviews

        held_text = {row["text"] for row in read_rows(data / "pretrain_eval.jsonl")}
        recipe = json.loads((data / "recipe.json").read_text())["recipe"]
        train_rows = train_rows + short_review_pairs(load_reviews(), recipe, a.short_pairs, held_text)
    tokenizer = AutoTokenizer.from_pretrained(a.run_dir / a.init / "final")
    model = AutoModelForSequenceClassification.from_pretrained(a.run_dir / a.init / "final", num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id)
    probe = probe_accuracy(train_rows, eval_rows)  # after the head's random init, which it would move
    kept = encode_rows(tokenizer, train_rows, a.max_length)
    train_rows, train = [row for row, _ in kept], [pair for _, pair in kept]  # the rows augmentation redraws from
    held_out = encode(tokenizer, eval_rows, a.max_length)
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    # linear warmup then linear decay to zero at the last step, as the stage's default schedule
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: (t + 1) / WARMUP if t < WARMUP else max(0.0, (a.steps - t) / (a.steps - WARMUP)))
    if a.embed_dropout:
        model.model.embed_tokens.register_forward_hook(
            lambda mod, inp, out: F.dropout(out, a.embed_dropout, training=mod.training))
    augment = a.word_dropout > 0 or a.crop_min > 0
    word_gen = random.Random(a.seed)
    order_gen = torch.Generator().manual_seed(a.seed)
    order, at = torch.randperm(len(train), generator=order_gen).tolist(), 0
    curve, start = [], time.time()
    print(f"{len(train)} training pairs, {len(held_out)} held out; bag-of-words probe on them: {probe:.4f}", flush=True)
    for step in range(1, a.steps + 1):
        if at + a.batch_size > len(order):
            order, at = torch.randperm(len(train), generator=order_gen).tolist(), 0
        if augment:  # the same pairs, their responses cut and thinned anew each time they are drawn
            batch = encode(tokenizer, [augmented(train_rows[i], a.word_dropout, a.crop_min, word_gen)
                                       for i in order[at : at + a.batch_size]], a.max_length)
        else:
            batch = [train[i] for i in order[at : at + a.batch_size]]
        at += a.batch_size
        n = len(batch)
        scores, mask = token_scores(model, [c for c, _ in batch] + [r for _, r in batch], pad)
        s = pooled(scores, mask, a.readout)
        loss = -F.logsigmoid(s[:n] - s[n:]).mean()
        if a.token_loss:
            label = torch.cat([torch.ones(n), torch.zeros(n)])[:, None].expand_as(scores)
            weight = mask.clone().float()
            weight[:, :RESPONSE_FROM] = 0
            per_token = F.binary_cross_entropy_with_logits(scores, label, reduction="none")
            loss = loss + a.token_loss * (per_token * weight).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == a.steps:
            acc = accuracy(model, held_out, pad, a.readout)
            curve.append({"step": step, "loss": loss.item(), "eval_accuracy": acc})
            print(f"step {step} loss {loss.item():.3f} held-out accuracy {acc:.4f} ({time.time() - start:.0f}s)",
                  flush=True)
    result = {"run_dir": str(a.run_dir), "args": {k: str(v) for k, v in vars(a).items()},
              "train_pairs": len(train), "eval_pairs": len(held_out), "bag_of_words_accuracy": probe,
              "final_accuracy": curve[-1]["eval_accuracy"], "curve": curve,
              "final_margins": [round(m, 4) for m in margins(model, held_out, pad, a.readout).tolist()]}
    if a.save:
        model.save_pretrained(a.save)
        tokenizer.save_pretrained(a.save)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("train_pairs", "bag_of_words_accuracy", "final_accuracy")}))


if __name__ == "__main__":
    main(sys.argv[1:])
