"""`bench/reward_variants.py`: the readouts and the pair encoding against hand-made numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import reward_variants  # noqa: E402

# two right-padded rows: lengths 3 and 2
SCORES = torch.tensor([[1.0, 2.0, 6.0, 9.0], [4.0, -2.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_last_token_readout_reads_the_last_real_token_as_the_hf_classifier_does():
    assert reward_variants.pooled(SCORES, MASK, "last").tolist() == [6.0, -2.0]


def test_mean_readout_averages_real_tokens_only():
    assert reward_variants.pooled(SCORES, MASK, "mean").tolist() == pytest.approx([3.0, 1.0])


class WordTokenizer:
    """One id per word of the turns' text, the way a chat template would concatenate them."""

    def apply_chat_template(self, turns, tokenize=True, return_dict=False):
        return [len(w) for t in turns for w in t["content"].split()]


def test_encode_keeps_pairs_whose_both_sides_fit_and_drops_the_rest():
    rows = [{"prompt": "a b", "chosen": "ccc", "rejected": "dd ee"},        # 3 and 4 tokens
            {"prompt": "a b", "chosen": "c d e f", "rejected": "g"}]        # 6 and 3: chosen too long
    assert reward_variants.encode(WordTokenizer(), rows, max_length=4) == [([1, 1, 3], [1, 1, 2, 2])]


def test_select_split_holds_out_every_window_of_the_last_pairs_and_scores_their_first():
    # three review pairs (prompts a, b, c), window 0 of each first, then window 1 of a and c
    rows = [{"prompt": p, "window": w} for w, ps in ((0, "abc"), (1, "ac")) for p in ps]
    train, held_out = reward_variants.select_split(rows, window0=3, n=2)
    assert train == [{"prompt": "a", "window": 0}, {"prompt": "a", "window": 1}]
    assert held_out == [{"prompt": "b", "window": 0}, {"prompt": "c", "window": 0}]


def test_encode_rows_keeps_the_rows_encode_keeps_in_its_order_beside_their_ids():
    rows = [{"prompt": "a b", "chosen": "c d e f", "rejected": "g"},        # chosen too long
            {"prompt": "a b", "chosen": "ccc", "rejected": "dd ee"}]
    assert [row for row, _ in reward_variants.encode_rows(WordTokenizer(), rows, max_length=4)] == rows[1:]
    assert reward_variants.encode_rows(WordTokenizer(), rows, max_length=4) == [(rows[1], ([1, 1, 3], [1, 1, 2, 2]))]


class FixedRandom:
    """random.Random's randint and random, answering from lists."""

    def __init__(self, ints, floats):
        self.ints, self.floats = list(ints), list(floats)

    def randint(self, lo, hi):
        value = self.ints.pop(0)
        assert lo <= value <= hi
        return value

    def random(self):
        return self.floats.pop(0)


def test_augmented_crops_a_run_of_words_then_drops_words_and_keeps_the_prompt():
    row = {"prompt": "p q", "chosen": "a b c d e", "rejected": "v w x y z"}
    # chosen: a run of 3 from word 1 ("b c d"), then "c" dropped; rejected: 4 from word 0, nothing dropped
    rng = FixedRandom([3, 1, 4, 0], [0.5, 0.05, 0.9, 0.5, 0.5, 0.5, 0.5])
    assert reward_variants.augmented(row, 0.1, 3, rng) == {"prompt": "p q", "chosen": "b d", "rejected": "v w x y"}


def test_augmented_keeps_one_word_when_dropout_takes_them_all_and_leaves_short_responses_uncut():
    row = {"prompt": "p", "chosen": "a b", "rejected": "c d"}
    assert reward_variants.augmented(row, 1.0, 3, FixedRandom([], [0.0] * 4)) == {"prompt": "p", "chosen": "a",
                                                                                  "rejected": "c"}


def test_short_review_pairs_pair_short_positive_with_negative_reviews_split_after_the_opening():
    from pipeline.movie_reviews import Review

    recipe = {"min_words": 6, "prompt_words": 2, "instruction": "Go:"}
    reviews = [Review("good fun film all round", 1, "rt"), Review("dull slow film no", 0, "rt"),
               Review("a b c d e f g", 1, "imdb"),            # 7 words: long, not short
               Review("too short", 0, "rt"),                  # under min_words=3
               Review("held out bad film", 0, "rt"),          # in exclude
               Review("great cast great script", 1, "rt"), Review("weak plot bad end", 0, "rt")]
    rows = reward_variants.short_review_pairs(reviews, recipe, min_words=3, exclude={"held out bad film"})
    assert len(rows) == 2
    pos = {"good fun film all round": "film all round", "great cast great script": "great script"}
    neg = {"dull slow film no": "film no", "weak plot bad end": "bad end"}
    for i, row in enumerate(rows):
        assert row["chosen"] in pos.values() and row["rejected"] in neg.values()
        source = pos if i % 2 == 0 else neg  # the prompt alternates between the pair's two reviews
        side = "chosen" if i % 2 == 0 else "rejected"
        opening = next(text for text, rest in source.items() if rest == row[side])
        assert row["prompt"] == "Go: " + " ".join(opening.split()[:2])
