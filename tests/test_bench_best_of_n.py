"""`bench/best_of_n.py`: the best-of-n maths against hand-computed numbers (the end-to-end run on a tiny
run dir is in tests/test_eval_cli.py, beside `rlhf eval` on the same run dir)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import best_of_n  # noqa: E402

# candidate k's score on prompt i: RM[k][i]; three candidates, two prompts
RM = [[0.1, 0.5], [0.3, 0.2], [0.3, 0.9]]
JUDGE = [[0.0, 1.0], [0.5, -1.0], [0.9, 0.2]]
BASELINE = [0.2, 0.2]


def test_kl_bound_is_log_n_minus_n_minus_1_over_n():
    assert best_of_n.best_of_n_kl_bound(1) == 0.0
    assert best_of_n.best_of_n_kl_bound(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)
    assert best_of_n.best_of_n_kl_bound(64) == pytest.approx(4.158883 - 0.984375, abs=1e-6)
    with pytest.raises(ValueError):
        best_of_n.best_of_n_kl_bound(0)


def test_picks_take_the_highest_score_among_the_first_n_and_the_first_on_a_tie():
    assert best_of_n.best_of_n_picks(RM, 1) == [0, 0]
    assert best_of_n.best_of_n_picks(RM, 2) == [1, 0]
    assert best_of_n.best_of_n_picks(RM, 3) == [1, 2]  # prompt 0: candidates 1 and 2 tie at 0.3
    with pytest.raises(ValueError):
        best_of_n.best_of_n_picks(RM, 4)


def test_win_judges_the_picks_against_the_baseline():
    # n=1: 0.0 vs 0.2 loses, 1.0 vs 0.2 wins
    assert best_of_n.best_of_n_win(RM, JUDGE, BASELINE, 1)["win_rate"] == 0.5
    # n=2 picks (1, 0): 0.5 and 1.0 both beat 0.2
    assert best_of_n.best_of_n_win(RM, JUDGE, BASELINE, 2)["win_rate"] == 1.0
    # n=3 picks (1, 2): 0.5 wins, 0.2 against 0.2 is a tie, not a win
    three = best_of_n.best_of_n_win(RM, JUDGE, BASELINE, 3)
    assert (three["wins"], three["ties"], three["losses"]) == (0.5, 0.5, 0.0)


def test_frontier_rows_double_n_up_to_the_candidates_and_the_judge_picks_its_own_best():
    rows = best_of_n.frontier(RM, JUDGE, BASELINE)
    assert [r["n"] for r in rows] == [1, 2]
    assert rows[1]["kl_bound"] == pytest.approx(math.log(2) - 0.5)
    # the judge's own pick at n=2: max(0.0, 0.5) = 0.5 and max(1.0, -1.0) = 1.0, both above 0.2
    assert rows[1]["judge_pick"]["win_rate"] == 1.0
    assert rows[0]["rm_pick"]["win_rate"] == rows[0]["judge_pick"]["win_rate"] == 0.5


def test_judge_agreement_counts_candidate_pairs_the_picker_orders_as_the_judge_does():
    # prompt 0: (0,1) and (0,2) agree, (1,2) is a picker tie at 0.3 (half); prompt 1: (0,1), (1,2) agree, (0,2) not
    assert best_of_n.judge_agreement(RM, JUDGE) == pytest.approx(4.5 / 6)
    # pairs the judge cannot tell apart are left out: only prompt 1's (0,2) and (1,2) are left, both ordered wrong
    flat = [[0.0, 1.0], [0.0, 1.0], [0.0, 0.2]]
    assert best_of_n.judge_agreement(RM, flat) == 0.0
    assert best_of_n.judge_agreement(JUDGE, JUDGE) == 1.0
