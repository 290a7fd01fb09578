"""Eval judging maths against numbers worked out by hand; VADER and wordfreq run offline."""

from __future__ import annotations

import math

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from pipeline import judging
from pipeline.judging import (
    distinct_n,
    guard_checks,
    load_judge,
    mean_and_stderr,
    real_word_share,
    summarize_policy,
    vader_judge,
    win_rate,
)

NOT_CALLABLE = 42


def fake_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """A judge for load_judge to import: the length of each response."""
    return [float(len(r)) for r in responses]


# distinct_n


def test_distinct_n_counts_repetition():
    texts = ["great great great", "a good movie"]
    # unigrams: great, great, great, a, good, movie = 6; distinct {great, a, good, movie} = 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (great great) x2, (a good), (good movie) = 4; distinct 3
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)


def test_distinct_n_does_not_cross_texts():
    # per text: (a b), (a b) -> 1 distinct / 2. Crossing would add (b a): 2 / 3.
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)


def test_distinct_n_keeps_case_and_handles_short_texts():
    # Great, great: 2 distinct / 2
    assert distinct_n(["Great great"], 1) == 1.0
    # "one" has no bigram; "two words" has 1 -> 1 / 1
    assert distinct_n(["one", "two words"], 2) == 1.0


def test_distinct_n_empty_is_zero_and_bad_n_raises():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["a"], 0)


# win_rate


def test_win_rate_with_ties():
    a = [1.0, 2.0, 3.0, 0.5]
    b = [0.0, 2.0, 4.0, 0.5 + 1e-12]
    # pair 1: 1 > 0 win; pair 2: equal, tie; pair 3: 3 < 4 loss; pair 4: |diff| 1e-12 <= 1e-9 tie
    # wins 1/4, ties 2/4, losses 1/4; win_rate = wins / n = 0.25 (ties not half wins)
    assert win_rate(a, b) == {"wins": 0.25, "ties": 0.5, "losses": 0.25, "win_rate": 0.25, "n": 4}


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


# real_word_share


def test_real_word_share_real_gibberish_and_mixed():
    assert real_word_share(["The movie was great and I loved it."]) == 1.0
    assert real_word_share(["xqzv blorptk"]) == 0.0
    # the, movie, was, great are real; xqzv, blorptk are not: 4 / 6
    assert real_word_share(["the movie xqzv was", "blorptk great"]) == pytest.approx(4 / 6)


def test_real_word_share_tokenizing():
    # Case folded, apostrophes kept inside words, quote marks stripped:
    # tokens the, movie, don't, hello -> all common words: 4 / 4
    assert real_word_share(["THE Movie", "Don't 'hello'"]) == 1.0
    # a lone "'" is not a word, so only "hello" counts: 1 / 1
    assert real_word_share(["' hello '"]) == 1.0


def test_real_word_share_threshold_and_empty():
    # "cinematography" has zipf ~3.2: real at the default 2.5, not at 4.0
    assert real_word_share(["cinematography"]) == 1.0
    assert real_word_share(["cinematography"], min_zipf=4.0) == 0.0
    assert real_word_share([]) == 0.0
    assert real_word_share(["123 !!! ..."]) == 0.0


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
    assert judging._vader() is judging._vader()


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


# summarize_policy


def test_summarize_policy_by_hand():
    responses = ["great great great", "a good movie"]
    summary = summarize_policy(["p1", "p2"], responses, [0.5, 0.1], [4, 6])
    # judge: mean 0.3; sample var ((0.2)^2 + (0.2)^2) / 1 = 0.08; stderr sqrt(0.08 / 2) = 0.2
    assert summary["judge_mean"] == pytest.approx(0.3)
    assert summary["judge_stderr"] == pytest.approx(0.2)
    assert summary["mean_length"] == 5.0  # (4 + 6) / 2
    assert summary["real_word_share"] == 1.0  # great, a, good, movie are all common words
    assert summary["distinct_1"] == pytest.approx(4 / 6)  # as in test_distinct_n_counts_repetition
    assert summary["distinct_2"] == pytest.approx(3 / 4)
    assert summary["n"] == 2


def test_summarize_policy_rejects_length_mismatch():
    with pytest.raises(ValueError, match="lengths differ"):
        summarize_policy(["p"], ["a", "b"], [0.1, 0.2], [1, 2])


# guard_checks


def _summary(real: float, d2: float) -> dict[str, float]:
    return {"real_word_share": real, "distinct_2": d2}


@pytest.mark.parametrize(
    "policy, ok",
    [
        # (0.9 - 0.855) / 0.9 = 0.05: exactly the limit passes (float rounding absorbed)
        (_summary(0.855, 0.4), {"real_word_share_ok": True, "distinct_2_ok": True}),
        # (0.9 - 0.85) / 0.9 = 0.0556 > 0.05; (0.5 - 0.4) / 0.5 = 0.2 is exactly the limit
        (_summary(0.85, 0.4), {"real_word_share_ok": False, "distinct_2_ok": True}),
        # (0.5 - 0.39) / 0.5 = 0.22 > 0.20
        (_summary(0.9, 0.39), {"real_word_share_ok": True, "distinct_2_ok": False}),
        # both rose: negative drops pass
        (_summary(0.95, 0.7), {"real_word_share_ok": True, "distinct_2_ok": True}),
    ],
)
def test_guard_checks_boundaries(policy, ok):
    assert guard_checks(policy, _summary(0.9, 0.5)) == ok


def test_guard_checks_limits_and_zero_baseline():
    # baseline 1.0 -> 0.95 is a drop of 0.05: passes at the default, fails with max 0.04
    assert guard_checks(_summary(0.95, 1.0), _summary(1.0, 1.0))["real_word_share_ok"]
    assert not guard_checks(_summary(0.95, 1.0), _summary(1.0, 1.0), max_real_word_drop=0.04)[
        "real_word_share_ok"
    ]
    # a zero baseline leaves nothing to drop from
    assert guard_checks(_summary(0.0, 0.0), _summary(0.0, 0.0)) == {
        "real_word_share_ok": True,
        "distinct_2_ok": True,
    }
