"""Critic-free estimators beside PPO's GAE: GRPO, RLOO, REINFORCE++ — the maths against hand numbers, the
config refusals, and runs that build three models (no critic), resume exactly after a kill, and keep two
ZeRO-3 ranks in lockstep."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from stages.ppo import estimators, maths

# ---- maths --------------------------------------------------------------------------------------------------------


def test_grpo_normalises_within_each_group():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, std 1 -> (-1, 0, 1) / (1 + 1e-4); group 2: all equal -> 0, not NaN
    expected = torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    torch.testing.assert_close(estimators.grpo_advantages(scores, 3), expected)
    # Dr. GRPO: the mean removed, no division
    torch.testing.assert_close(estimators.grpo_advantages(scores, 3, scale=False),
                               torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0])[:4]
    # 1 - (2+3+4)/3 = -2; 2 - (1+3+4)/3 = -2/3; 3 - 7/3 = 2/3; 4 - 2 = 2
    torch.testing.assert_close(estimators.rloo_advantages(scores, 4), torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]))
    torch.testing.assert_close(estimators.rloo_advantages(torch.tensor([3.0, 3.0]), 2), torch.zeros(2))
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        estimators.rloo_advantages(torch.ones(4), 3)


def test_reinforce_pp_whitens_returns_over_the_batch():
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.1, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # returns (gamma 1): (0.8, 0.9, 1.0) and (0.4, 0.5); mean 0.72; unbiased var 0.268 / 4 = 0.067
    std = 0.067 ** 0.5
    expected = torch.tensor([[0.08 / std, 0.18 / std, 0.28 / std], [-0.32 / std, -0.22 / std, 0.0]])
    torch.testing.assert_close(estimators.reinforce_pp_advantages(rewards, mask, 1.0), expected, atol=1e-4, rtol=1e-4)


def test_sequence_advantage_on_every_real_token():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert estimators.per_token(torch.tensor([2.0, -1.0]), mask).tolist() == [[2, 2, 0], [-1, -1, -1]]


def test_loss_aggregation():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert float(maths.aggregate(loss, mask, "token_mean")) == 3.0  # 15 / 5 tokens
    assert float(maths.aggregate(loss, mask, "seq_mean_token_sum")) == 7.5  # (6 + 9) / 2 responses


def settings(**kw):
    base = dict(kl_estimator="k1", kl_in="reward", reward_clip=None, advantage_estimator="grpo", samples_per_prompt=2,
                grpo_scale_rewards=False, gamma=1.0, lam=0.95, whiten_advantages=True)
    return SimpleNamespace(**{**base, **kw})


def test_grpo_outcome_is_the_score_less_the_summed_kl_penalty():
    from pipeline.scoring import Rollout
    from stages.ppo.experience import Scores, advantages

    mask = torch.ones(2, 2)
    r = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.zeros(2, 2, dtype=torch.long), mask,
                torch.tensor([True, True]))
    logprobs, ref = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]), torch.tensor([[-2.0, -1.0], [-1.0, -1.0]])
    scores = torch.tensor([1.0, 1.0])
    scored = Scores(logprobs, ref, values=torch.zeros(2, 2), raw_scores=scores)
    # k1 KL: row 0 sums to 1, row 1 to 0; outcome = 1 - 0.5 * 1 = 0.5 and 1; Dr. GRPO: 0.5 - 0.75 = -0.25, +0.25
    adv = advantages(scored, scores, r, settings(), kl_coef=0.5).advantages
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))
    # KL as a loss term instead: the outcome is the score alone, equal in the group -> no advantage
    adv = advantages(scored, scores, r, settings(kl_in="loss"), kl_coef=0.5).advantages
    assert adv.abs().max() == 0


@pytest.mark.parametrize("estimator", ["gae", "reinforce_pp"])
def test_advantages_of_a_batch_split_over_two_ranks_are_the_one_rank_ones(estimator):
    """Whitening takes the whole batch's statistics, so the ranks a batch is spread over change nothing.
    With each rank's own statistics, a rank holding one good response would whiten it to the same
    advantages as another rank's bad one (each row's mean forced to zero)."""
    from pipeline.scoring import Rollout
    from stages.ppo.experience import Scores, advantages
    from tests.test_ppo_maths import ranks_sharing

    mask = torch.ones(2, 3)
    r = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.zeros(2, 3, dtype=torch.long), mask,
                torch.tensor([True, True]))
    scored = Scores(torch.zeros(2, 3), torch.zeros(2, 3), values=torch.tensor([[0.1, 0.2, 0.3]] * 2),
                    raw_scores=torch.tensor([1.0, -1.0]))
    cfg = settings(advantage_estimator=estimator, samples_per_prompt=1)
    whole = advantages(scored, scored.raw_scores, r, cfg, kl_coef=0.05).advantages

    def rank_share(i: int, all_reduce) -> torch.Tensor:
        row = slice(i, i + 1)
        share = Rollout(r.prompt_ids[row], r.prompt_mask[row], r.responses[row], r.mask[row], r.ended[row])
        mine = Scores(scored.logprobs[row], scored.ref_logprobs[row], scored.values[row], scored.raw_scores[row])
        return advantages(mine, mine.raw_scores, share, cfg, kl_coef=0.05, all_reduce=all_reduce).advantages

    torch.testing.assert_close(torch.cat(ranks_sharing(2)(rank_share, [0, 1])), whole)
    assert (whole[0] > 0).all() and (whole[1] < 0).all()  # the good response is pushed up, the bad one down


@pytest.mark.parametrize("overrides, message", [
    ({"advantage_estimator": "grpo"}, "ppo.samples_per_prompt: must be >= 2 for advantage_estimator grpo"),
    ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "must be >= 2 for advantage_estimator rloo"),
    ({"samples_per_prompt": 3, "rollout_batch_size": 4, "minibatch_size": 8},
     "ppo.minibatch_size: must divide rollout_batch_size x samples_per_prompt (12)"),
    ({"advantage_estimator": "vtrace"}, "ppo.advantage_estimator"),
    ({"loss_agg": "sum"}, "ppo.loss_agg"),
])
def test_bad_estimator_settings_are_refused(overrides, message):
    from pipeline.config import build_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config({"ppo": {"rollout_batch_size": 8, "minibatch_size": 4, **overrides}})


# ---- runs ---------------------------------------------------------------------------------------------------------

from tests.test_ppo_stage import (RUN_TIMEOUT_S, assert_same_weights, cli_env, final_weights, metric_rows,  # noqa: E402
                                  ppo_context, rlhf_command, rlhf_run, single_process_group, tiny, without_time,
                                  write_config)
from tests.conftest import kill_at_checkpoint  # noqa: E402

__all__ = ["single_process_group", "tiny"]  # fixtures shared with the PPO stage's tests
GRPO = dict(advantage_estimator="grpo", samples_per_prompt=2, rollout_batch_size=4, minibatch_size=4,
            kl_in="loss", loss_agg="seq_mean_token_sum")


def manifest(run_dir):
    return json.loads((run_dir / "ppo" / "final" / "manifest.json").read_text())


@pytest.mark.slow
def test_grpo_builds_three_models_and_resumes_exactly_after_a_kill(tiny, tmp_path):
    config = write_config(tmp_path / "grpo.yaml", tiny, eval_enabled=False, **GRPO)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    rlhf_run(config, run_a)
    m = manifest(run_a)
    assert set(m["metrics"]["sharding"]["engines"]) == {"actor", "reference", "reward"}  # no critic
    rows = metric_rows(run_a)
    assert sorted(rows) == [1, 2, 3, 4] and "ppo/value_loss" not in rows[4] and "ppo/kl_loss" in rows[4]

    kill_at_checkpoint(rlhf_command(config, run_b), run_b / "ppo" / "checkpoint-2", tmp_path / "killed.log", cli_env(),
                       RUN_TIMEOUT_S)
    out = rlhf_run(config, run_b)
    assert f"resumed from {run_b / 'ppo' / 'checkpoint-2'} at step 2" in out, out[-4000:]
    assert_same_weights(final_weights(run_a), final_weights(run_b))
    assert [without_time(metric_rows(run_b)[s]) for s in (1, 2, 3, 4)] == [without_time(rows[s]) for s in (1, 2, 3, 4)]


@pytest.mark.slow
def test_rloo_on_two_zero3_ranks(tiny, tmp_path):
    config = write_config(tmp_path / "rloo.yaml", tiny, deepspeed={"config": "zero3", "num_gpus": 2},
                          eval_enabled=False, max_steps=2, save_steps=None, **{**GRPO, "advantage_estimator": "rloo"})
    rlhf_run(config, tmp_path / "run")
    m = manifest(tmp_path / "run")
    assert m["world_size"] == 2
    engines = m["metrics"]["sharding"]["engines"]
    assert set(engines) == {"actor", "reference", "reward"}
    assert all(len(e["per_rank"]) == 2 for e in engines.values())
    assert sorted(metric_rows(tmp_path / "run")) == [1, 2]


@pytest.mark.slow
def test_one_epoch_of_one_minibatch_takes_the_old_logprobs_from_the_update_forward(tiny, tmp_path,
                                                                                  single_process_group):
    """With ppo_epochs 1, one minibatch and the KL as a loss term, scoring skips the actor's forward (as TRL's
    GRPOTrainer does with num_iterations=1): the update's forward gives the old log-probs. The step is the
    same as with the separate forward: same weights, statistics, KL and log-probs."""
    from pipeline.generation import encode_prompts, left_pad
    from stages.ppo import experience as xp
    from stages.ppo.engines import build_models
    from stages.ppo.update import update
    from stages.ppo.value_process import InProcess

    one_pass = {**GRPO, "ppo_epochs": 1, "minibatch_size": 8}
    ctx = ppo_context(tiny, tmp_path, **one_pass)
    cfg = ctx.config.ppo
    assert cfg.old_logprobs_from_update
    assert not ppo_context(tiny, tmp_path, **{**one_pass, "ppo_epochs": 2}).config.ppo.old_logprobs_from_update
    assert not ppo_context(tiny, tmp_path, **{**one_pass, "kl_in": "reward"}).config.ppo.old_logprobs_from_update
    tok = tiny.tokenizer
    prompts = [p for p in ["A fine film", "It was", "The plot", "Why"] for _ in range(2)]
    ids, mask = left_pad(encode_prompts(tok, prompts, 32), tok.pad_token_id)
    results = []
    for scored_first in (True, False):
        torch.manual_seed(0)
        models = build_models(ctx, tok, total_updates=2)
        values = InProcess(models)
        r = xp.rollout(models.actor, ids, mask, cfg, tok, torch.Generator().manual_seed(0))
        scored = xp.score(models, values, r, cfg.temperature, with_actor=scored_first)
        assert (scored.logprobs is None) == (not scored_first)
        adv = xp.advantages(scored, scored.raw_scores, r, cfg, 0.05)
        stats = update(models, values, xp.Experience(rollout=r, scores=scored, advantages=adv), cfg, 8,
                       torch.Generator().manual_seed(1), kl_coef=0.05)
        weights = {k: v.detach().clone() for k, v in models.actor.module.state_dict().items()}
        results.append((r.responses, scored.logprobs, adv.kl, adv.advantages, stats, weights))
    (resp_a, logp_a, kl_a, adv_a, stats_a, w_a), (resp_b, logp_b, kl_b, adv_b, stats_b, w_b) = results
    assert torch.equal(resp_a, resp_b) and torch.equal(adv_a, adv_b)
    torch.testing.assert_close(logp_b, logp_a, rtol=0, atol=1e-6)  # filled in by the update, every row
    torch.testing.assert_close(kl_b, kl_a, rtol=0, atol=1e-6)
    assert stats_b.keys() == stats_a.keys() and stats_b["clipfrac"] == 0.0
    assert all(abs(stats_b[k] - stats_a[k]) <= 1e-6 for k in stats_a), (stats_a, stats_b)
    assert all(torch.allclose(w_a[k], w_b[k], rtol=0, atol=1e-7) for k in w_a)
