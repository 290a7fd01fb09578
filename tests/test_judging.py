"""Judges and paired comparison against numbers worked out by hand; VADER runs offline."""

from __future__ import annotations

import math

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from pipeline.evaluation import judges
from pipeline.evaluation.evaluate import verdict
from pipeline.evaluation.judges import load_judge, mean_and_stderr, sign_test_p, vader_judge, win_rate

NOT_CALLABLE = 42


def fake_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """A judge for load_judge to import: the length of each response."""
    return [float(len(r)) for r in responses]


# win_rate


def test_win_rate_with_ties():
    a = [1.0, 2.0, 3.0, 0.5]
    b = [0.0, 2.0, 4.0, 0.5 + 1e-12]
    # pair 1: 1 > 0 win; pair 2: equal, tie; pair 3: 3 < 4 loss; pair 4: |diff| 1e-12 <= 1e-9 tie
    # wins 1/4, ties 2/4, losses 1/4; win_rate = wins / n = 0.25 (ties not half wins)
    # sign test on the 2 untied pairs, 1 win: P(X >= 1 | n=2, 1/2) = 3/4
    assert win_rate(a, b) == {"wins": 0.25, "ties": 0.5, "losses": 0.25, "win_rate": 0.25, "n": 4, "sign_test_p": 0.75}


def test_win_rate_all_wins_and_just_above_tie_tolerance():
    # 1e-6 > 1e-9, so both pairs are wins: win_rate 1.0
    result = win_rate([0.3, -0.2], [0.3 - 1e-6, -0.5])
    assert result["wins"] == 1.0 and result["ties"] == 0.0 and result["losses"] == 0.0
    assert result["win_rate"] == 1.0


def test_win_rate_rejects_mismatch_empty_and_nan():
    with pytest.raises(ValueError, match="2 scores against 1"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no scores"):
        win_rate([], [])
    with pytest.raises(ValueError, match="finite"):
        win_rate([math.nan], [0.0])


def test_sign_test_p_by_hand():
    assert sign_test_p(9, 1) == pytest.approx(11 / 1024)  # (C(10,9) + C(10,10)) / 2^10
    assert sign_test_p(5, 5) == pytest.approx((252 + 210 + 120 + 45 + 10 + 1) / 1024)
    assert sign_test_p(0, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 0) == 1 / 8


# verdict


def _results(rates: dict[str, tuple[int, int, int]], failed: dict[str, list[str]] | None = None) -> dict:
    """Hand-built results: per temperature (wins, ties, losses) of ppo against sft, and the guards that failed."""
    blocks = {}
    for t, (w, ti, lo) in rates.items():
        n = w + ti + lo
        guards = {"rep_2_ok": True, "top_bigram_share_ok": True, "fluency_nll_ok": True, "kl_budget_ok": True}
        guards.update({f"{g}_ok": False for g in (failed or {}).get(t, [])})
        blocks[t] = {"win_rates": {"ppo": {"wins": w / n, "ties": ti / n, "losses": lo / n, "win_rate": w / n,
                                           "n": n, "sign_test_p": sign_test_p(w, lo)}},
                     "guards": {"ppo": guards}}
    return {"settings": {"baseline": "sft"}, "temperatures": blocks}


def test_verdict_win_needs_significance_at_every_temperature():
    win = verdict(_results({"0.7": (150, 10, 40), "1": (120, 10, 70)}), "ppo")
    assert win["win"] and win["ahead_at"] == ["0.7", "1"] and win["hacking_suspected"] == []
    assert win["line"] == "ppo vs sft: win at T=0.7 (0.750) and T=1 (0.600); no guard fired"
    # 95 wins against 77 losses: more wins, but one-sided sign test p = 0.097, not below 0.05
    close = verdict(_results({"0.7": (150, 10, 40), "1": (95, 23, 77)}), "ppo")
    assert not close["win"] and close["ahead_at"] == ["0.7"]
    assert close["line"].startswith("ppo vs sft: no win: ahead at T=0.7 only (T=1: wins 0.487, losses 0.395, sign test p=")
    behind = verdict(_results({"0.7": (40, 10, 150), "1": (50, 0, 50)}), "ppo")
    assert behind["line"].startswith("ppo vs sft: no win: not ahead at any temperature (T=0.7: ")


def test_verdict_names_fired_guards_with_their_temperatures():
    hacked = verdict(_results({"0.7": (190, 0, 10), "1": (180, 0, 20)},
                              {"0.7": ["rep_2", "top_bigram_share"], "1": ["top_bigram_share"]}), "ppo")
    assert not hacked["win"] and hacked["hacking_suspected"] == ["rep_2", "top_bigram_share"]
    assert hacked["line"] == ("ppo vs sft: reward hacking suspected: rep_2 (T=0.7), top_bigram_share (T=0.7/1)")


def test_verdict_says_which_guards_were_not_measured():
    results = _results({"0.7": (150, 10, 40)})
    del results["temperatures"]["0.7"]["guards"]["ppo"]["fluency_nll_ok"]
    assert verdict(results, "ppo")["line"].endswith("; no guard fired (not measured: fluency_nll)")


# mean_and_stderr


def test_mean_and_stderr_by_hand():
    # mean = 10 / 4 = 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5;
    # sample var = 5 / 3; stderr = sqrt(5 / 3) / sqrt(4) = sqrt(5 / 12) = 0.6454972...
    mean, stderr = mean_and_stderr([1, 2, 3, 4])
    assert mean == 2.5
    assert stderr == pytest.approx(math.sqrt(5 / 12))
    assert stderr == pytest.approx(0.6454972244)


def test_mean_and_stderr_small_n():
    assert mean_and_stderr([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_and_stderr([])


# vader_judge and load_judge


def test_vader_judge_orders_sentiment_and_matches_analyzer():
    positive = "This movie was wonderful, I loved every minute of it!"
    negative = "This movie was terrible, boring and awful."
    scores = vader_judge(["prompt", "prompt"], [positive, negative])
    assert scores[0] > 0.5
    assert scores[1] < -0.5
    analyzer = SentimentIntensityAnalyzer()
    assert scores == [
        analyzer.polarity_scores(positive)["compound"],
        analyzer.polarity_scores(negative)["compound"],
    ]


def test_vader_judge_scores_response_only():
    # A hateful prompt must not move the score of the response.
    direct = SentimentIntensityAnalyzer().polarity_scores("I loved it.")["compound"]
    assert vader_judge(["I hated this awful film."], ["I loved it."]) == [direct]


def test_vader_analyzer_is_built_once():
    assert judges._vader() is judges._vader()


def test_vader_judge_rejects_mismatch():
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        vader_judge(["p"], ["a", "b"])


def test_load_judge_vader():
    assert load_judge("vader") is vader_judge


def test_load_judge_module_callable():
    judge = load_judge("tests.test_judging:fake_judge")
    assert judge(["p", "q"], ["abc", ""]) == [3.0, 0.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:judge", "cannot import module 'no_such_module_xyz'"),
        ("tests.test_judging:nope", "has no attribute 'nope'"),
        ("tests.test_judging:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
        (":fake_judge", "both parts non-empty"),
        ("tests.test_judging:", "both parts non-empty"),
        ("vaderr", "expected 'vader' or 'module:callable'"),
        ("runs/demo/reward_model", "expected 'vader' or 'module:callable'"),
    ],
)
def test_load_judge_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_judge(spec)
    assert f"judge '{spec}'" in str(info.value)
    assert "\n" not in str(info.value)
