"""`bench/reward_probe.py`: the bag-of-words probe's features and fit, on words and on a tokenizer's units."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import reward_probe  # noqa: E402


def test_features_are_log_one_plus_count_of_each_unit():
    x = reward_probe.features(["good good film", "bad"], {"bad": 0, "film": 1, "good": 2})
    assert x.flatten().tolist() == pytest.approx([0.0, math.log(2), math.log(3), math.log(2), 0.0, 0.0])


def test_features_count_the_units_a_split_gives():
    # split on letters: "aab" has a twice and b once
    x = reward_probe.features(["aab"], {"a": 0, "b": 1}, split=list)
    assert x.flatten().tolist() == pytest.approx([math.log(3), math.log(2)])


PAIRS = [{"prompt": "p", "chosen": f"fine film {i} great", "rejected": f"dull film {i} awful"} for i in range(40)]
HELD_OUT = [{"prompt": "p", "chosen": "great", "rejected": "awful"}, {"prompt": "p", "chosen": "fine", "rejected": "dull"}]


def test_probe_learns_which_units_side_with_chosen():
    assert reward_probe.probe_accuracy(PAIRS, HELD_OUT) == 1.0
    vocab, weights = reward_probe.fit_probe(PAIRS)
    assert weights[vocab["great"]] > 0 > weights[vocab["awful"]]
    assert abs(weights[vocab["film"]]) < 1e-3  # on both sides of every pair: no gradient but the L2 pull


def test_units_seen_fewer_than_min_count_times_are_left_out():
    vocab, _ = reward_probe.fit_probe([{"prompt": "p", "chosen": "rare good good", "rejected": "bad bad"}])
    assert set(vocab) == {"good", "bad"}


def test_token_split_gives_the_tokenizer_ids_without_special_tokens():
    class Ids:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([0] if add_special_tokens else []) + [len(w) for w in text.split()]}

    assert reward_probe.token_split(Ids())("a bb ccc") == ["1", "2", "3"]
