"""PPO phase 4, the update: `ppo_epochs` passes of clipped policy and value steps over minibatches.

Under ZeRO-3 each training forward + backward gathers its model whole when it fits DeepSpeed's
live-parameter budget (`pipeline.zero3.gathered_for_update`); the optimizer step follows the release.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from pipeline.zero3 import gathered_for_update
from stages.ppo import experience as xp
from stages.ppo import maths
from stages.ppo.value_process import InProcess


def minibatch(r: xp.Rollout, idx: torch.Tensor) -> xp.Rollout:
    return xp.Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.responses[idx], r.mask[idx], r.ended[idx])


def actor_update(models, r: xp.Rollout, old_logprobs: torch.Tensor, advantages: torch.Tensor, cfg,
                 ref_logprobs: torch.Tensor, kl_coef: float) -> dict[str, float]:
    """One clipped policy-gradient step of the actor on a minibatch (plus the k3 KL term with `kl_in: loss`)."""
    stats = {}
    with gathered_for_update(models.actor):
        logits = xp.response_logits(models.actor, r) / cfg.temperature
        logprobs = maths.logprobs_from_logits(logits, r.responses)
        pg_loss, clipfrac, approx_kl = maths.policy_loss(logprobs, old_logprobs, advantages, r.mask, cfg.clip_range,
                                                         cfg.loss_agg)
        entropy = maths.masked_mean(maths.entropy_from_logits(logits), r.mask)
        loss = pg_loss - cfg.entropy_coef * entropy if cfg.entropy_coef else pg_loss
        if cfg.kl_in == "loss":
            kl_loss = maths.aggregate(maths.kl_estimate(logprobs, ref_logprobs, "k3"), r.mask, cfg.loss_agg)
            loss = loss + kl_coef * kl_loss
            stats["kl_loss"] = float(kl_loss.detach())
        models.actor.backward(loss)
    models.actor.step()
    return {"policy_loss": float(pg_loss.detach()), "clipfrac": float(clipfrac), "approx_kl": float(approx_kl),
            "entropy": float(entropy.detach()), **stats}


def critic_update(models, r: xp.Rollout, old_values: torch.Tensor, returns: torch.Tensor,
                  clip_range_value: float) -> dict[str, float]:
    """One clipped value-regression step of the critic on the same minibatch."""
    with gathered_for_update(models.critic):
        values = xp.response_values(models.critic, r)
        vf_loss, vf_clipfrac = maths.value_loss(values, old_values, returns, r.mask, clip_range_value)
        models.critic.backward(vf_loss)
    models.critic.step()
    return {"value_loss": float(vf_loss.detach()), "value_clipfrac": float(vf_clipfrac)}


def update(models, exp: xp.Experience, cfg, minibatch_size: int, generator: torch.Generator,
           value_runner=None, kl_coef: float = 0.0) -> dict[str, float]:
    """Phase 4: `ppo_epochs` passes of clipped policy and value updates over shuffled minibatches.

    The critic's steps (gae only) go to `value_runner` (stages/ppo/value_process.py) before the actor's: in a
    value process they run there while the actor's run here, in the same order as in one process.
    """
    value_runner = value_runner or InProcess(models)
    stats: dict[str, list[float]] = defaultdict(list)
    critic_steps = []
    n = exp.logprobs.shape[0]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n, minibatch_size):
            idx = order[start : start + minibatch_size]
            r = minibatch(exp.rollout, idx)
            if cfg.uses_critic:
                critic_steps.append(value_runner.submit(critic_update, r, exp.values[idx], exp.returns[idx],
                                                        cfg.clip_range_value))
            for key, value in actor_update(models, r, exp.logprobs[idx], exp.advantages[idx], cfg,
                                           exp.ref_logprobs[idx], kl_coef).items():
                stats[key].append(value)
    for step in critic_steps:
        for key, value in step.result().items():
            stats[key].append(value)
    return {k: sum(v) / len(v) for k, v in stats.items()}
