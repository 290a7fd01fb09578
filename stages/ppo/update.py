"""PPO phase 4, the update: `ppo_epochs` passes of clipped policy and value steps over minibatches.

Under ZeRO-3 each training forward + backward gathers its model whole when it fits DeepSpeed's
live-parameter budget (`pipeline.zero3.gathered_for_update`); the optimizer step follows the release.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from pipeline.zero3 import gathered_for_update
from stages.ppo import experience as xp
from stages.ppo import maths


def minibatch(r: xp.Rollout, idx: torch.Tensor) -> xp.Rollout:
    return xp.Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.responses[idx], r.mask[idx], r.ended[idx])


def minibatch_order(n: int, epochs: int, minibatch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The rows of each minibatch, epoch after epoch: a fresh shuffle of the `n` rows per epoch."""
    order = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator, device=generator.device)
        order += [perm[start : start + minibatch_size] for start in range(0, n, minibatch_size)]
    return order


@dataclass
class CriticBatch:
    """What one critic step reads (b = minibatch rows)."""

    rollout: xp.Rollout  # the minibatch's rows of the rollout
    old_values: torch.Tensor  # [b, T] the critic's values at scoring time
    returns: torch.Tensor  # [b, T] its targets


def actor_update(models, r: xp.Rollout, old_logprobs: torch.Tensor | None, advantages: torch.Tensor, cfg,
                 ref_logprobs: torch.Tensor, kl_coef: float) -> tuple[dict[str, float], torch.Tensor]:
    """One clipped policy-gradient step of the actor on a minibatch (plus the k3 KL term with `kl_in: loss`).

    Returns its statistics and the minibatch's log-probs before the step; `old_logprobs` None: these are
    the old ones (ppo.old_logprobs_from_update, where the policy being trained is the one that sampled)."""
    stats = {}
    with gathered_for_update(models.actor):
        logits = xp.response_logits(models.actor, r, cfg.temperature)
        logprobs = maths.logprobs_from_logits(logits, r.responses)
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
        pg_loss, clipfrac, approx_kl = maths.policy_loss(logprobs, old_logprobs, advantages, r.mask, cfg.clip_range,
                                                         cfg.loss_agg)
        if cfg.entropy_coef:
            entropy = maths.masked_mean(maths.entropy_from_logits(logits), r.mask)
            loss = pg_loss - cfg.entropy_coef * entropy
        else:
            # logged only: outside autograd, so its softmax and log-softmax ([b, T, V] each, GiBs at a
            # 150k vocabulary) are not held through the backward pass; one row at a time, so their
            # temporaries are one row's, not another three [b, T, V] tensors at the forward's peak
            with torch.no_grad():
                entropy = maths.masked_mean(torch.cat([maths.entropy_from_logits(row) for row in logits.split(1)]),
                                            r.mask)
            loss = pg_loss
        if cfg.kl_in == "loss":
            kl_loss = maths.aggregate(maths.kl_estimate(logprobs, ref_logprobs, "k3"), r.mask, cfg.loss_agg)
            loss = loss + kl_coef * kl_loss
            stats["kl_loss"] = float(kl_loss.detach())
        del logits  # autograd keeps what it needs; this name alone would hold [b, T+1, V] through the backward
        models.actor.backward(loss)
    models.actor.step()
    return ({"policy_loss": float(pg_loss.detach()), "clipfrac": float(clipfrac), "approx_kl": float(approx_kl),
             "entropy": float(entropy.detach()), **stats}, logprobs.detach())


def critic_update(models, r: xp.Rollout, old_values: torch.Tensor, returns: torch.Tensor,
                  clip_range_value: float) -> dict[str, float]:
    """One clipped value-regression step of the critic on the same minibatch."""
    with gathered_for_update(models.critic):
        values = xp.response_values(models.critic, r)
        vf_loss, vf_clipfrac = maths.value_loss(values, old_values, returns, r.mask, clip_range_value)
        models.critic.backward(vf_loss)
    models.critic.step()
    return {"value_loss": float(vf_loss.detach()), "value_clipfrac": float(vf_clipfrac)}


def critic_steps(models, batches: list[CriticBatch], clip_range_value: float) -> list[dict[str, float]]:
    """The critic's steps of one update, in order (on the value side: stages/ppo/value_process.py)."""
    return [critic_update(models, b.rollout, b.old_values, b.returns, clip_range_value) for b in batches]


def update(models, values, exp: xp.Experience, cfg, minibatch_size: int, generator: torch.Generator,
           kl_coef: float = 0.0) -> dict[str, float]:
    """Phase 4: `ppo_epochs` passes of clipped policy and value updates over shuffled minibatches.

    The critic's steps (gae only) go to the value side (`values`, stages/ppo/value_process.py); in a
    value process they run there while the actor's run here. Returns each statistic's mean over the steps.
    """
    s, a = exp.scores, exp.advantages
    batches = minibatch_order(s.ref_logprobs.shape[0], cfg.ppo_epochs, minibatch_size, generator)
    deferred = s.logprobs is None  # ppo.old_logprobs_from_update: one minibatch, one epoch

    def actor_steps() -> list[dict[str, float]]:
        steps = []
        for idx in batches:
            stats, before = actor_update(models, minibatch(exp.rollout, idx), None if deferred else s.logprobs[idx],
                                         a.advantages[idx], cfg, s.ref_logprobs[idx], kl_coef)
            if deferred:  # what scoring left out, for the KL metrics and controller
                s.logprobs = torch.empty_like(s.ref_logprobs).index_copy_(0, idx, before)
                a.kl = maths.kl_estimate(s.logprobs, s.ref_logprobs, cfg.kl_estimator)
            steps.append(stats)
        return steps

    if cfg.uses_critic:
        critic = [CriticBatch(minibatch(exp.rollout, idx), s.values[idx], a.returns[idx]) for idx in batches]
        critic_stats, actor_stats = values.update(critic, cfg.clip_range_value, meanwhile=actor_steps)
    else:
        critic_stats, actor_stats = [], actor_steps()
    stats: dict[str, list[float]] = defaultdict(list)
    for step in actor_stats + critic_stats:
        for key, value in step.items():
            stats[key].append(value)
    return {k: sum(v) / len(v) for k, v in stats.items()}
