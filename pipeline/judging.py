"""Did alignment work? Judge scores, win rates and reward-hacking guards as pure functions.

Nothing here loads a model. The eval stage generates continuations from the SFT and the PPO
policy for the same held-out prompts, scores both with an independent judge (VADER by default,
which no stage trains on, so PPO cannot have learned to game it), and passes the scores here.
The guards catch the usual ways a policy games a learned reward: gibberish and repetition.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import wordfreq

# A judge maps (prompts, responses) to one score per response, higher is better.
Judge = Callable[[list[str], list[str]], list[float]]

# Zipf 2.5 is about 0.3 uses per million words. Rare but real words clear it easily
# ("cinematography" 3.2, "thee" 4.0) while letter soup scores 0 ("xqzv", "blorptk") or
# below 2.5 ("asdf" 1.7, "zq" 1.6). Short fragments like "bl" (3.4) still pass, so this
# flags gibberish, not every odd token.
REAL_WORD_MIN_ZIPF = 2.5
# Scores closer than this count as a tie: judges round, and 1e-9 is far below any real difference.
TIE_TOLERANCE = 1e-9
# Slack on the guard thresholds so that a drop of exactly the limit passes despite float rounding.
GUARD_TOLERANCE = 1e-9

_WORD = re.compile(r"[A-Za-z']+")


@functools.cache
def _vader() -> Any:
    """The VADER analyzer, built once: construction reads the lexicon from disk."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound score in [-1, 1] of each response; the prompt is not scored."""
    if len(prompts) != len(responses):
        raise ValueError(f"vader_judge: {len(prompts)} prompts but {len(responses)} responses")
    # Response only: the prompt is the same for both policies and would only dilute the difference.
    return [float(_vader().polarity_scores(r)["compound"]) for r in responses]


def load_judge(spec: str) -> Judge:
    """'vader' gives vader_judge; 'module:callable' imports that callable. Anything else raises."""
    if spec == "vader":
        return vader_judge
    if ":" not in spec:
        raise ValueError(f"judge '{spec}': expected 'vader' or 'module:callable'")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"judge '{spec}': expected 'module:callable' with both parts non-empty")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"judge '{spec}': cannot import module '{module_name}' ({exc})") from exc
    judge = getattr(module, attr, None)
    if judge is None:
        raise ValueError(f"judge '{spec}': module '{module_name}' has no attribute '{attr}'")
    if not callable(judge):
        raise ValueError(f"judge '{spec}': '{attr}' is a {type(judge).__name__}, not callable")
    return judge


def real_word_share(texts: Sequence[str], min_zipf: float = REAL_WORD_MIN_ZIPF) -> float:
    """Share of word tokens, over all texts, that are common English words; 0.0 if no words."""
    # Apostrophes at the ends are quote marks, not part of the word; a lone "'" is no word.
    words = [w.strip("'") for t in texts for w in _WORD.findall(t.lower())]
    words = [w for w in words if w]
    if not words:
        return 0.0
    real = sum(wordfreq.zipf_frequency(w, "en") >= min_zipf for w in words)
    return real / len(words)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams of whitespace tokens; 0.0 when there are none.

    N-grams do not cross text boundaries, and tokens are compared as written (case kept).
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = []
    for text in texts:
        tokens = text.split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> dict[str, float]:
    """Pairwise comparison of a against b on the same prompts.

    Returns wins, ties and losses as fractions of pairs (summing to 1), win_rate = wins / n
    (a tie is not half a win; it is reported on its own) and n.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_rate: {len(scores_a)} scores against {len(scores_b)}")
    if not scores_a:
        raise ValueError("win_rate: no scores to compare")
    if not all(math.isfinite(s) for s in (*scores_a, *scores_b)):
        raise ValueError("win_rate: scores must be finite (a NaN would silently count as a loss)")
    wins = ties = 0
    for a, b in zip(scores_a, scores_b):
        if abs(a - b) <= TIE_TOLERANCE:
            ties += 1
        elif a > b:
            wins += 1
    n = len(scores_a)
    return {"wins": wins / n, "ties": ties / n, "losses": (n - wins - ties) / n,
            "win_rate": wins / n, "n": n}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std, ddof=1, over sqrt(n)); stderr 0.0 when n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_stderr: no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize_policy(
    prompts: Sequence[str],
    responses: Sequence[str],
    judge_scores: Sequence[float],
    response_token_lengths: Sequence[int],
) -> dict[str, float]:
    """One policy's eval summary: judge mean and stderr, length in tokens, and the guard metrics."""
    n = len(responses)
    if not (len(prompts) == len(judge_scores) == len(response_token_lengths) == n):
        raise ValueError(
            f"summarize_policy: lengths differ: {len(prompts)} prompts, {n} responses, "
            f"{len(judge_scores)} scores, {len(response_token_lengths)} token lengths"
        )
    judge_mean, judge_stderr = mean_and_stderr(judge_scores)
    return {
        "judge_mean": judge_mean,
        "judge_stderr": judge_stderr,
        "mean_length": sum(response_token_lengths) / n,
        "real_word_share": real_word_share(responses),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "n": n,
    }


def _relative_drop_ok(policy: float, baseline: float, max_drop: float) -> bool:
    # A baseline of 0 leaves nothing to drop from; a rise is a negative drop and always passes.
    if baseline <= 0:
        return True
    return (baseline - policy) / baseline <= max_drop + GUARD_TOLERANCE


def guard_checks(
    policy: dict[str, float],
    baseline: dict[str, float],
    max_real_word_drop: float = 0.05,
    max_distinct2_drop: float = 0.20,
) -> dict[str, bool]:
    """Reward-hacking guards on two summarize_policy dicts: relative drop vs baseline within limits.

    Drop = (baseline - policy) / baseline. A policy that wins on the judge by emitting
    gibberish loses real words; one that repeats a praise word loses distinct bigrams.
    """
    return {
        "real_word_share_ok": _relative_drop_ok(
            policy["real_word_share"], baseline["real_word_share"], max_real_word_drop
        ),
        "distinct_2_ok": _relative_drop_ok(
            policy["distinct_2"], baseline["distinct_2"], max_distinct2_drop
        ),
    }
