"""Judges and paired comparison: who scores each response, and how two policies compare.

A judge maps (prompts, responses) to one score per response, higher is better. `vader` (the
demo's, a sentiment lexicon no stage trains on), a Python `module:callable`, or a reward-model
checkpoint that is not the one PPO optimised (a gold judge) scored by `RewardModelScorer`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

Judge = Callable[[list[str], list[str]], list[float]]

# Scores closer than this count as a tie: judges round, and 1e-9 is far below any real difference.
TIE_TOLERANCE = 1e-9


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


def is_model_judge(spec: str) -> bool:
    return spec != "vader" and ":" not in spec


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


def build_judge(spec: str, device: str = "cpu", trust_remote_code: bool = False) -> Judge:
    """Any judge `eval.judge` names: a reward-model checkpoint (a gold judge) as a `RewardModelScorer`,
    else what `load_judge` gives."""
    if is_model_judge(spec):
        from pipeline.evaluation.sampling import RewardModelScorer

        return RewardModelScorer(spec, device, trust_remote_code=trust_remote_code)
    return load_judge(spec)


def _same_model(a: Path, b: Path) -> bool:
    """The same checkpoint dir, or one holding byte-identical weights (a copy of it)."""
    if a.resolve() == b.resolve():
        return True
    weights_a, weights_b = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    return (bool(weights_a) and [w.name for w in weights_a] == [w.name for w in weights_b]
            and all(x.read_bytes() == y.read_bytes() for x, y in zip(weights_a, weights_b)))


def check_judge(spec: str, optimised_reward_model: str | Path | None = None) -> None:
    """Reject a judge that cannot load before any model is, naming the setting; and a reward-model judge
    (a dir, or a hub id that is reachable or cached) that is the reward model PPO optimised against (a policy
    is always "good" by its own reward)."""
    if is_model_judge(spec):
        from pipeline.models import model_source

        if not Path(spec).is_dir() and spec.count("/") != 1:
            close = difflib.get_close_matches(spec, ["vader"], n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"eval.judge: '{spec}'{hint} is not 'vader', a 'module:callable', a reward-model dir or "
                            "a hub id")
        spec = model_source(spec, "eval.judge")  # a hub id: reachable or cached, else one line now
        if optimised_reward_model and Path(optimised_reward_model).is_dir() and _same_model(
                Path(spec), Path(optimised_reward_model)):
            raise UserError(f"eval.judge: {spec} is the reward model PPO optimised ({optimised_reward_model}); "
                            "a judge must be independent of it: vader, another (gold) reward model, or module:callable")
        return
    try:
        load_judge(spec)
    except ValueError as err:
        raise UserError(f"eval.judge: {err}") from None


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
    losses = n - wins - ties
    return {"wins": wins / n, "ties": ties / n, "losses": losses / n,
            "win_rate": wins / n, "n": n, "sign_test_p": sign_test_p(wins, losses)}


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided sign test: the chance of at least `wins` wins among the untied pairs if a win and a
    loss were equally likely (exact binomial, p = 1/2). 1.0 when every pair is tied."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


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
