"""PPO maths as small pure functions: masked statistics, KL, rewards, GAE, losses, KL control.

Shapes: B = batch, T = response length, V = vocabulary. `mask` is [B, T], 1.0 for real
response tokens (EOS included) and 0.0 for padding after EOS. Masked positions are selected
with `torch.where`, not multiplied away, because padding logprobs can be -inf or garbage and
`inf * 0` is NaN.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from pipeline.scoring import logprobs_from_logits  # noqa: F401 (shared with the evaluation)

WHITEN_EPS = 1e-8
AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks (the trainer's; absent on one)
KL_ESTIMATORS = ("k1", "k2", "k3")


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` [B, T] over unmasked positions: a scalar, or reduced along `dim`."""
    x = _zero_pad(x, mask)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Mean of `x` [B, T] over unmasked positions; a fully masked slice gives 0, not NaN.

    With `all_reduce` (scalar mean only) the sum and the count are summed over the ranks first, so every
    rank gets the mean of the whole batch, not of its own share of it.
    """
    if all_reduce is not None:
        if dim is not None:
            raise ValueError("masked_mean reduces over ranks only to a scalar (dim=None)")
        # float64: a count of tokens over many ranks is not exact in bf16 (or even fp32 past 2^24)
        total = all_reduce(torch.stack([masked_sum(x, mask).double(), mask.sum().double()]))
        return (total[0] / total[1].clamp(min=1)).to(x.dtype)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
                    all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (scalars) of `x` [B, T] over all unmasked positions (of every rank's batch with
    `all_reduce`)."""
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = masked_mean((x - mean) ** 2, mask, all_reduce=all_reduce)
    if unbiased:
        count = mask.sum() if all_reduce is None else all_reduce(mask.sum().double()).to(var.dtype)
        if count < 2:
            raise ValueError(f"unbiased variance needs at least 2 unmasked elements, got {int(count)}")
        var = var * count / (count - 1)
    return mean, var


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Variance (scalar) of `x` [B, T] over all unmasked positions (of every rank's batch with `all_reduce`)."""
    return masked_mean_var(x, mask, unbiased, all_reduce)[1]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Scale `x` [B, T] to unit variance over unmasked positions (and zero mean if `shift_mean`).

    With `all_reduce` the mean and variance are those of the whole batch across ranks, so the
    advantages do not depend on how many ranks share it (and one short response on a rank is fine).
    Padding comes back as 0 so it cannot leak into a later sum.
    """
    mean, var = masked_mean_var(x, mask, all_reduce=all_reduce)  # one mean, not one here and one in the variance
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_pad(whitened, mask)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate [B, T] of KL(policy || reference) from sampled-token logprobs [B, T].

    Schulman's estimators: k1 = log(p/q) (unbiased, can be negative), k2 = log(p/q)^2 / 2,
    k3 = (r - 1) - log r with r = q/p (unbiased and never negative).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # expm1 keeps r - 1 accurate when the policy is still close to the reference.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def compute_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float,
    mask: torch.Tensor,
    clip_reward: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: the KL penalty everywhere, plus `score` [B] on the last real token.

    Returns (rewards, non_score_reward), both [B, T] with padding 0. `clip_reward` clips the
    score to [-clip_reward, clip_reward] before it is added.
    """
    non_score_reward = _zero_pad(-kl_coef * kl, mask)
    if clip_reward is not None:
        if clip_reward <= 0:
            raise ValueError(f"clip_reward must be positive, got {clip_reward}")
        score = score.clamp(-clip_reward, clip_reward)
    real = mask.bool()
    if not real.any(dim=1).all():
        raise ValueError("every row needs at least one unmasked token to carry its score")
    # Highest unmasked index per row; multiplying positions by the mask sends padding to 0.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * real).argmax(dim=1)
    rewards = non_score_reward.clone()
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards, non_score_reward


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over rewards and values [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}, where V and A
    beyond the last real token are 0 (the episode ends there). Returns (advantages, returns),
    both [B, T], returns = advantages + values, padding 0.
    """
    rewards, values = _zero_pad(rewards, mask), _zero_pad(values, mask)
    length = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantage = _zero_pad(advantage, mask[:, t])
        advantages.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages_bt = torch.stack(advantages[::-1], dim=1)
    return advantages_bt, _zero_pad(advantages_bt + values, mask)


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, how: str = "token_mean") -> torch.Tensor:
    """A per-token loss [B, T] as one number: `token_mean` (mean over all real tokens) or
    `seq_mean_token_sum` (each response's token sum, averaged over responses)."""
    if how == "token_mean":
        return masked_mean(loss, mask)
    if how == "seq_mean_token_sum":
        return masked_sum(loss, mask, dim=1).mean()
    raise ValueError(f"unknown loss aggregation {how!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    agg: str = "token_mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate over [B, T] tensors. Returns (loss, clipfrac, approx_kl), scalars.

    loss = aggregate (see `aggregate`) of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)); clipfrac is
    the share of tokens where the clipped term won; approx_kl = mean of (logprobs - old_logprobs)^2 / 2.
    """
    # Zero the log-ratio at padding before exp so a garbage pad cannot overflow to inf and
    # turn the (unused) gradient there into NaN.
    log_ratio = _zero_pad(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, agg)
    # Metrics only: detached so nobody backpropagates through them by accident.
    clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio**2, mask).detach()
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss over [B, T] tensors. Returns (loss, value_clipfrac), scalars.

    loss = 0.5 * mean of max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask).detach()
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [B, T] of the softmax of finite `logits` [B, T, V].

    H = -sum(p * log p) with log p from log_softmax (z - logsumexp z), which subtracts the max
    first. The textbook logsumexp(z) - sum(p * z) cancels two large numbers and loses ~1e-4
    in float32 once logits sit near 1000.
    """
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def missing_eos_penalty(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores [B] minus `penalty` on rows whose response was cut off before EOS (bool [B])."""
    return scores - penalty * (~ended_with_eos.bool()).to(scores.dtype)


class KLController(Protocol):
    """What the PPO loop needs from a KL coefficient schedule."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: nudge the KL coefficient so the observed KL tracks `target`.

    Each update moves the coefficient by at most 20% * n_steps / horizon, so one noisy batch
    cannot swing it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        # Only the coefficient evolves; target and horizon come from the run config.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
