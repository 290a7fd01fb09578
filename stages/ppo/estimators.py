"""Critic-free advantage estimators beside GAE, as small pure functions: GRPO, RLOO, REINFORCE++.

The rollout batch holds `group` responses per prompt in consecutive rows ([B] = prompts x group), so a
prompt's samples are one row block: scores.view(-1, group). Shapes: B = responses, T = response tokens.

- GRPO (Shao et al. 2024): A_i = (s_i - mean(group)) / (std(group) + eps); with `scale=False`, only the
  mean is removed (Dr. GRPO, Liu et al. 2025, which finds the std division biases toward easy prompts).
- RLOO (Ahmadian et al. 2024): A_i = s_i - mean of the other samples of the prompt
  = group / (group - 1) * (s_i - mean(group)).
- REINFORCE++ (Hu 2025): per-token rewards (the KL penalty on every token, the score on the last),
  returns G_t = sum_{k >= t} gamma^(k-t) r_k, whitened over the whole batch's tokens.
The sequence advantages of GRPO and RLOO apply to every token of the response.
"""

from __future__ import annotations

import torch

from stages.ppo import maths

GROUP_STD_EPS = 1e-4  # as in GRPO implementations: a group of equal scores gives 0, not 0 / 0


def grouped(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Scores [B] as [prompts, group]; B must be a whole number of groups."""
    if scores.dim() != 1 or scores.numel() % group:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group}")
    return scores.view(-1, group)


def grpo_advantages(scores: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """Group-normalised outcome advantage [B]: score minus its group's mean, over the group's std if `scale`."""
    g = grouped(scores, group)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + GROUP_STD_EPS)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Leave-one-out baseline [B]: each score minus the mean of the other scores of its prompt."""
    if group < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = grouped(scores, group)
    others_mean = (g.sum(dim=1, keepdim=True) - g) / (group - 1)
    return (g - others_mean).reshape(-1)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence advantage [B] on every real token of its response: [B, T], padding 0."""
    return torch.where(mask.bool(), advantages[:, None].to(mask.dtype).expand_as(mask), torch.zeros_like(mask))


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                            all_reduce: maths.AllReduce | None = None) -> torch.Tensor:
    """Discounted returns of per-token rewards [B, T], whitened over every real token of the batch
    (of every rank's share of it with `all_reduce`)."""
    returns, _ = maths.gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return maths.masked_whiten(returns, mask, all_reduce=all_reduce)
