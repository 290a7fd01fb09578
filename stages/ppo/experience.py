"""PPO phases 1-3 for one rollout batch on one rank: rollout, score, advantages.

Each phase hands the next a named container: `Rollout` (prompts and sampled responses), `Scores`
(what the four models say about them), `Advantages` (what the update trains towards); the update
reads all three as one `Experience`.

Shapes: B = this rank's rollout batch, P = prompt width (left-padded), T = response width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.generation import ended_with_eos, response_mask, sample, stop_token_ids
from pipeline.scoring import (Rollout, last_token_scores, response_logits, response_logprobs,  # noqa: F401 (re-exported)
                             response_values, sequence_inputs)
from pipeline.zero3 import gathered_module
from stages.ppo import estimators, maths


@dataclass
class Scores:
    """Phase 2: the four models on a rollout."""

    logprobs: torch.Tensor | None  # [B, T] actor log-probs at sampling time (the "old" policy); None until the
    # update's forward gives them (ppo.old_logprobs_from_update)
    ref_logprobs: torch.Tensor  # [B, T] reference log-probs
    values: torch.Tensor  # [B, T] critic values before each response token (zeros without a critic)
    raw_scores: torch.Tensor  # [B] reward model at the last real token


@dataclass
class Advantages:
    """Phase 3: the shaped per-token rewards and what the actor and the critic train towards."""

    kl: torch.Tensor | None  # [B, T] per-token KL estimate (in the reward with kl_in: reward); None until the
    # actor's log-probs are known (ppo.old_logprobs_from_update: after the update)
    rewards: torch.Tensor  # [B, T] -kl_coef * kl, plus the shaped score at the last real token
    advantages: torch.Tensor  # [B, T] by ppo.advantage_estimator (GAE whitened if configured)
    returns: torch.Tensor  # [B, T] advantages + values (critic targets); the advantages without a critic


@dataclass
class Experience:
    """One rollout batch as phase 4 trains on it."""

    rollout: Rollout
    scores: Scores
    advantages: Advantages


def rollout(actor_engine, prompt_ids, prompt_mask, cfg, tokenizer, generator) -> Rollout:
    with gathered_module(actor_engine) as model:
        stops = stop_token_ids(tokenizer, model)
        responses = sample(
            model, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens, eos_id=stops,
            pad_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
            min_new_tokens=cfg.min_new_tokens,
        )
    return Rollout(prompt_ids, prompt_mask, responses, response_mask(responses, stops), ended_with_eos(responses, stops))


def score(models, values, r: Rollout, temperature: float, with_actor: bool = True) -> Scores:
    """Phase 2: old log-probs, reference log-probs, values and raw scores for a rollout.

    The critic and the reward model score on the value side (`values`, stages/ppo/value_process.py);
    in a value process they do while the actor and the reference score here. `with_actor=False` leaves the
    old log-probs to the update (ppo.old_logprobs_from_update).
    """
    (critic_values, raw_scores), (logprobs, ref_logprobs) = values.score(
        r, meanwhile=lambda: policy_logprobs(models, r, temperature, with_actor))
    return Scores(logprobs, ref_logprobs, critic_values, raw_scores)


# Scoring is one no-grad forward per model, so under ZeRO-3 each model is gathered whole for it
# (`gathered_module`: one collective, no per-block hooks). Going through the hooks instead would also
# leave a forward-only access trace in DeepSpeed's parameter coordinator that the next training
# forward+backward finds stale, so the first update epoch would run without prefetching.


@torch.no_grad()
def value_scores(models, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic values (zeros when the estimator builds no critic) and reward-model scores."""
    if models.critic is None:
        values = torch.zeros(r.responses.shape, dtype=torch.float32, device=r.responses.device)
    else:
        with gathered_module(models.critic) as critic:
            values = response_values(critic, r)
    with gathered_module(models.reward) as reward:
        return values, last_token_scores(reward, r)


@torch.no_grad()
def policy_logprobs(models, r: Rollout, temperature: float,
                    with_actor: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The actor's (None without `with_actor`) and the reference's log-probs of the sampled tokens."""
    logprobs = None
    with gathered_module(models.actor) as actor:
        if with_actor:
            logprobs = response_logprobs(actor, r, temperature)
        if models.reference is None:  # LoRA actor: its base model with the adapters switched off
            with actor.disable_adapter():
                ref_logprobs = response_logprobs(actor, r, temperature)
    if models.reference is not None:
        with gathered_module(models.reference) as reference:
            ref_logprobs = response_logprobs(reference, r, temperature)
    return logprobs, ref_logprobs


class RunningMoments:
    """Running mean/std of scores across steps and ranks, for reward normalisation (checkpointed)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        mean, var = float(x.mean()), float(x.var(unbiased=False)) if n > 1 else 0.0
        total = self.count + n
        delta = mean - self.mean
        self.m2 += var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(raw: torch.Tensor, r: Rollout, cfg, moments: RunningMoments, all_gather) -> torch.Tensor:
    """Penalise responses without EOS, then normalise with running stats or centre on the first batch's mean
    (clipping comes in the reward). [B]"""
    scores = raw
    if cfg.missing_eos_penalty is not None:
        scores = maths.missing_eos_penalty(scores, r.ended, cfg.missing_eos_penalty)
    if cfg.normalize_reward:
        moments.update(all_gather(scores))  # the whole global batch, so every rank keeps the same stats
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    elif cfg.center_reward:
        # A pairwise-trained reward model's scores carry an arbitrary offset that differs from seed to seed;
        # measured once on the starting policy's own responses (checkpointed with the moments), it is taken
        # out so that reward_clip means the same gain over that policy on every seed.
        if moments.count == 0:
            moments.update(all_gather(scores))
        scores = scores - moments.mean
    return scores


def advantages(s: Scores, scores: torch.Tensor, r: Rollout, cfg, kl_coef: float,
               all_reduce: maths.AllReduce | None = None) -> Advantages:
    """Phase 3: per-token KL, shaped rewards, advantages by `cfg.advantage_estimator` and the critic's returns.

    `scores` [B] are the raw scores after `shape_scores`. The KL penalty is in the rewards unless
    `kl_in: loss` (then the update adds it as a k3 term).
    gae: GAE over the critic's values (whitened if configured). grpo/rloo: each response's outcome (its
    score less its summed KL penalty) against the other samples of its prompt, on every token.
    reinforce_pp: batch-whitened returns. Without a critic, `returns` is the advantage (unused).
    Whitening takes the whole rollout batch's statistics: `all_reduce` sums them over the ranks.
    """
    kl = None if s.logprobs is None else maths.kl_estimate(s.logprobs, s.ref_logprobs, cfg.kl_estimator)
    coef = kl_coef if cfg.kl_in == "reward" else 0.0
    in_reward = kl if kl is not None else torch.zeros_like(s.ref_logprobs)  # None only with kl_in: loss
    rewards, _ = maths.compute_rewards(scores, in_reward, coef, r.mask, clip_reward=cfg.reward_clip)
    if cfg.advantage_estimator == "gae":
        adv, returns = maths.gae_advantages(rewards, s.values, r.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = maths.masked_whiten(adv, r.mask, all_reduce=all_reduce)
        return Advantages(kl, rewards, adv, returns)
    if cfg.advantage_estimator == "reinforce_pp":
        adv = estimators.reinforce_pp_advantages(rewards, r.mask, cfg.gamma, all_reduce)
    else:
        outcome = maths.masked_sum(rewards, r.mask, dim=1)
        if cfg.advantage_estimator == "grpo":
            seq = estimators.grpo_advantages(outcome, cfg.samples_per_prompt, cfg.grpo_scale_rewards)
        else:
            seq = estimators.rloo_advantages(outcome, cfg.samples_per_prompt)
        adv = estimators.per_token(seq, r.mask)
    return Advantages(kl, rewards, adv, adv)
