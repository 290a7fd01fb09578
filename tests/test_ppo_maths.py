"""PPO maths against numbers worked out by hand. Padding holds garbage on purpose: it must not matter."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from stages.ppo.maths import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    entropy_from_logits,
    gae_advantages,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    missing_eos_penalty,
    policy_loss,
    value_loss,
)

NAN, INF = float("nan"), float("inf")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Real tokens 1, 2 | 4; everything after them is padding.
X = t([[1.0, 2.0, NAN], [4.0, INF, -INF]])
MASK = t([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_ignore_padding_even_nan_and_inf():
    assert_close(masked_sum(X, MASK), torch.tensor(7.0))  # 1 + 2 + 4
    assert_close(masked_sum(X, MASK, dim=1), t([3.0, 4.0]))  # 1 + 2 | 4
    assert_close(masked_mean(X, MASK), torch.tensor(7.0 / 3))  # 7 / 3 real tokens
    assert_close(masked_mean(X, MASK, dim=1), t([1.5, 4.0]))  # 3 / 2 | 4 / 1


def test_masked_mean_of_fully_masked_row_is_zero_not_nan():
    mask = t([[1, 1, 0], [0, 0, 0]])
    assert_close(masked_mean(X, mask, dim=1), t([1.5, 0.0]))  # (1 + 2) / 2 | 0 / max(0, 1)


def test_masked_var_biased_and_unbiased():
    x = t([[1.0, 2.0, 99.0], [3.0, NAN, 99.0]])
    # values 1, 2, 3; mean 2; squared deviations 1, 0, 1 -> sum 2
    assert_close(masked_var(x, MASK, unbiased=False), torch.tensor(2.0 / 3))  # 2 / 3
    assert_close(masked_var(x, MASK, unbiased=True), torch.tensor(1.0))  # 2 / (3 - 1)


def test_masked_var_unbiased_needs_two_elements():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([[5.0, 1.0]]), t([[1, 0]]))


def test_masked_whiten():
    x = t([[2.0, 4.0, 123.0], [6.0, NAN, -7.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # values 2, 4, 6: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> (x - 4) / 2; padding -> 0
    assert_close(masked_whiten(x, mask), t([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    # shift_mean=False adds the mean 4 back: -1 + 4, 0 + 4, 1 + 4
    assert_close(masked_whiten(x, mask, shift_mean=False), t([[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]]))


def ranks_sharing(world: int):
    """`world` threads standing in for ranks, and an all_reduce that sums a tensor over them as gloo would."""
    import threading

    barrier, parts = threading.Barrier(world), {}

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        parts[threading.get_ident()] = x.clone()
        barrier.wait()
        total = sum(parts.values())
        barrier.wait()  # every rank has read every part before the next call overwrites them
        return total

    def run(fn, shares: list) -> list:
        out = [None] * world
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(shares[i], all_reduce)))
                   for i in range(world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return out

    return run


def test_masked_whiten_over_ranks_uses_the_whole_batch():
    x = t([[2.0, 4.0, 123.0], [6.0, NAN, -7.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # rank 0 holds row 0 (values 2, 4), rank 1 row 1 (value 6): together mean 4 and std 2, as one rank sees them
    run = ranks_sharing(2)
    rows = run(lambda i, reduce: masked_whiten(x[i : i + 1], mask[i : i + 1], all_reduce=reduce), [0, 1])
    assert_close(torch.cat(rows), t([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    # rank 1's single token alone has no variance; with the whole batch it is whitened like any other
    assert_close(torch.cat(run(lambda i, reduce: masked_var(x[i : i + 1], mask[i : i + 1], all_reduce=reduce)
                               .reshape(1), [0, 1])), t([4.0, 4.0]))
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(x, mask, dim=1, all_reduce=lambda v: v)


LN2 = math.log(2.0)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        # log p - log q = ln 0.5 - ln 0.25 = ln 2 | ln 0.25 - ln 0.5 = -ln 2
        ("k1", [LN2, -LN2]),  # 0.693147, -0.693147
        ("k2", [0.5 * LN2**2, 0.5 * LN2**2]),  # 0.5 * 0.480453 = 0.240227 both
        # r = q / p = 1/2 -> (0.5 - 1) - ln 0.5 = ln 2 - 0.5 = 0.193147
        # r = 2           -> (2 - 1) - ln 2 = 1 - ln 2 = 0.306853
        ("k3", [LN2 - 0.5, 1.0 - LN2]),
    ],
)
def test_kl_estimators(estimator, expected):
    logprobs = torch.log(t([[0.5, 0.25]]))
    ref_logprobs = torch.log(t([[0.25, 0.5]]))
    assert_close(kl_estimate(logprobs, ref_logprobs, estimator), t([expected]))


def test_k3_is_zero_when_policy_equals_reference():
    logprobs = t([[-0.1, -3.0, -20.0]])
    assert_close(kl_estimate(logprobs, logprobs.clone(), "k3"), torch.zeros(1, 3))  # r = 1 -> 0 - 0


def test_unknown_kl_estimator_names_the_choices():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


SCORE = t([1.0, 5.0])
KL = t([[0.1, 0.2, 0.3], [0.4, 0.5, INF]])
KL_MASK = t([[1, 1, 1], [1, 1, 0]])


def test_compute_rewards_puts_score_on_last_real_token():
    rewards, non_score = compute_rewards(SCORE, KL, kl_coef=0.5, mask=KL_MASK)
    # -0.5 * kl; the inf at padding becomes 0
    assert_close(non_score, t([[-0.05, -0.10, -0.15], [-0.20, -0.25, 0.0]]))
    # row 0: last real index 2 -> -0.15 + 1 = 0.85; row 1: last real index 1 -> -0.25 + 5 = 4.75
    assert_close(rewards, t([[-0.05, -0.10, 0.85], [-0.20, 4.75, 0.0]]))


def test_compute_rewards_clips_the_score():
    rewards, _ = compute_rewards(SCORE, KL, kl_coef=0.5, mask=KL_MASK, clip_reward=2.0)
    # scores clip to 1, 2 -> row 1 last token -0.25 + 2 = 1.75
    assert_close(rewards, t([[-0.05, -0.10, 0.85], [-0.20, 1.75, 0.0]]))


def test_compute_rewards_rejects_a_row_with_no_real_tokens():
    with pytest.raises(ValueError, match="at least one unmasked"):
        compute_rewards(SCORE, KL, kl_coef=0.5, mask=t([[1, 1, 1], [0, 0, 0]]))


# Row 0 is three real tokens; row 1 ends after two, its third slot is garbage.
GAE_REWARDS = t([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])
GAE_VALUES = t([[0.5, 0.4, 0.3], [1.0, 0.5, 3.0]])
GAE_MASK = t([[1, 1, 1], [1, 1, 0]])


def test_gae_by_hand():
    advantages, returns = gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.5)
    # gamma * lam = 0.45.  Row 0:
    #   t2: delta = 1 + 0.9*0 - 0.3 = 0.7;       A2 = 0.7
    #   t1: delta = 0 + 0.9*0.3 - 0.4 = -0.13;   A1 = -0.13 + 0.45*0.7 = 0.185
    #   t0: delta = 0 + 0.9*0.4 - 0.5 = -0.14;   A0 = -0.14 + 0.45*0.185 = -0.05675
    # Row 1 (terminal after t1, so V2 = 0 and A2 = 0 whatever the padding holds):
    #   t1: delta = 2 + 0.9*0 - 0.5 = 1.5;       A1 = 1.5
    #   t0: delta = 0 + 0.9*0.5 - 1.0 = -0.55;   A0 = -0.55 + 0.45*1.5 = 0.125
    assert_close(advantages, t([[-0.05675, 0.185, 0.7], [0.125, 1.5, 0.0]]))
    # returns = A + V: 0.44325, 0.585, 1.0 | 1.125, 2.0, padding 0
    assert_close(returns, t([[0.44325, 0.585, 1.0], [1.125, 2.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_returns_reward_to_go():
    _, returns = gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=1.0)
    # Values telescope away: R_t = sum of rewards from t to the end. Row 0: 1, 1, 1; row 1: 2, 2, pad 0
    assert_close(returns, t([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))


def test_gae_ignores_padding_contents():
    garbage_rewards = GAE_REWARDS.clone()
    garbage_rewards[1, 2] = NAN
    garbage_values = GAE_VALUES.clone()
    garbage_values[1, 2] = -1e6
    expected = gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, 0.9, 0.5)
    assert_close(gae_advantages(garbage_rewards, garbage_values, GAE_MASK, 0.9, 0.5), expected)


def _policy_inputs():
    # log ratios: ln 1.5, ln 0.5 | ln 0.5, 0; padding logprob 200 would overflow exp if used
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    log_ratio = t([[math.log(1.5), math.log(0.5), 201.0], [math.log(0.5), 0.0, 202.0]])
    logprobs = (old + log_ratio).requires_grad_()
    advantages = t([[1.0, 1.0, 5.0], [-2.0, 3.0, 5.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    return logprobs, old, advantages, mask


def test_policy_loss_by_hand():
    logprobs, old, advantages, mask = _policy_inputs()
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # token  ratio  A    -A*ratio  -A*clip(ratio,0.8,1.2)  max    clipped wins?
    #  a     1.5    1    -1.5      -1.2                    -1.2   yes
    #  b     0.5    1    -0.5      -0.8                    -0.5   no
    #  c     0.5   -2     1.0       1.6                     1.6   yes
    #  d     1.0    3    -3.0      -3.0                    -3.0   no (tie)
    assert_close(loss, torch.tensor(-0.775))  # (-1.2 - 0.5 + 1.6 - 3.0) / 4 = -3.1 / 4
    assert_close(clipfrac, torch.tensor(0.5))  # 2 / 4
    # 0.5 * mean(ln1.5^2, ln0.5^2, ln0.5^2, 0) = 0.5 * (0.164402 + 2 * 0.480453) / 4 = 0.140664
    assert_close(approx_kl, torch.tensor(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4))


def test_policy_loss_gradient_flows_only_through_unclipped_real_tokens():
    logprobs, old, advantages, mask = _policy_inputs()
    loss, _, _ = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    loss.backward()
    # d(-A*ratio)/dlogp = -A*ratio, divided by 4 tokens; clipped tokens a, c get 0:
    # b: -1 * 0.5 / 4 = -0.125;  d: -3 * 1 / 4 = -0.75;  padding 0 (not NaN, despite exp(201))
    assert_close(logprobs.grad, t([[0.0, -0.125, 0.0], [0.0, -0.75, 0.0]]))


def test_value_loss_by_hand():
    values = t([[1.0, 0.6], [0.0, 50.0]])
    old_values = t([[0.5, 0.5], [0.5, -50.0]])
    returns = t([[1.0, 0.0], [1.0, NAN]])
    mask = t([[1, 1], [1, 0]])
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token  v    old  R    clip(v)  (v-R)^2  (clip-R)^2  max   clipped wins?
    #  a     1.0  0.5  1.0  0.7      0        0.09        0.09  yes
    #  b     0.6  0.5  0.0  0.6      0.36     0.36        0.36  no (tie)
    #  c     0.0  0.5  1.0  0.3      1.0      0.49        1.0   no
    assert_close(loss, torch.tensor(0.5 * 1.45 / 3))  # 0.5 * (0.09 + 0.36 + 1.0) / 3 = 0.241667
    assert_close(clipfrac, torch.tensor(1.0 / 3))


def test_entropy_from_logits():
    logits = t([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    # uniform over 2 -> ln 2 = 0.693147
    # probs 0.25, 0.75 -> -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    expected = t([[LN2, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    assert_close(entropy_from_logits(logits), expected)
    # Shifting all logits by 1000 changes nothing and does not overflow.
    assert_close(entropy_from_logits(logits + 1000.0), expected)


def test_logprobs_from_logits():
    # row of logits ln1, ln2, ln5 -> probs 1/8, 2/8, 5/8; second position uniform over 3
    logits = t([[[0.0, LN2, math.log(5.0)], [7.0, 7.0, 7.0]]])
    labels = torch.tensor([[2, 0]])
    # ln(5/8) = -0.470004;  ln(1/3) = -1.098612
    assert_close(logprobs_from_logits(logits, labels), t([[math.log(5 / 8), math.log(1 / 3)]]))


def test_missing_eos_penalty():
    scores = t([1.0, 2.0, -0.5])
    ended = torch.tensor([True, False, False])
    # rows 1 and 2 lose 1.0: 2 - 1 = 1, -0.5 - 1 = -1.5
    assert_close(missing_eos_penalty(scores, ended, penalty=1.0), t([1.0, 1.0, -1.5]))
    assert_close(scores, t([1.0, 2.0, -0.5]))  # input untouched


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=1000)
    # error 9/6 - 1 = 0.5 -> clipped 0.2; mult 1 + 0.2 * 1000/10000 = 1.02; 0.2 * 1.02 = 0.204
    assert ctl.value == pytest.approx(0.204)
    ctl.update(current_kl=5.4, n_steps=1000)
    # error 5.4/6 - 1 = -0.1; mult 1 - 0.1 * 0.1 = 0.99; 0.204 * 0.99 = 0.20196
    assert ctl.value == pytest.approx(0.20196)
    ctl.update(current_kl=0.0, n_steps=1000)
    # error -1 -> clipped -0.2; mult 0.98; 0.20196 * 0.98 = 0.1979208
    assert ctl.value == pytest.approx(0.1979208)


def test_adaptive_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="positive"):
        AdaptiveKLController(init_kl_coef=0.2, target=0.0, horizon=10000)


def test_adaptive_kl_controller_state_round_trips():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 1000)
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    # After resuming, the two evolve identically.
    ctl.update(3.0, 500)
    resumed.update(3.0, 500)
    assert resumed.value == ctl.value


def test_fixed_kl_controller_never_moves_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(0.9)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_center_reward_subtracts_the_first_batch_mean_once():
    """ppo.center_reward: the first batch's mean score (after the EOS penalty) is measured once and taken out
    of every later score; the moments it lives in are what the checkpoint saves."""
    from types import SimpleNamespace

    from stages.ppo.experience import RunningMoments, shape_scores

    cfg = SimpleNamespace(missing_eos_penalty=1.0, normalize_reward=False, center_reward=True)
    moments, gather = RunningMoments(), lambda x: x
    first = SimpleNamespace(ended=torch.tensor([True, True, True, False]))
    # [1, 3, -1, 1 - 1] has mean 0.75
    assert_close(shape_scores(torch.tensor([1.0, 3.0, -1.0, 1.0]), first, cfg, moments, gather),
                 torch.tensor([0.25, 2.25, -1.75, -0.75]))
    later = SimpleNamespace(ended=torch.tensor([True, True]))
    assert_close(shape_scores(torch.tensor([2.0, 0.0]), later, cfg, moments, gather), torch.tensor([1.25, -0.75]))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert_close(shape_scores(torch.tensor([2.0, 0.0]), later, cfg, restored, gather), torch.tensor([1.25, -0.75]))
    off = SimpleNamespace(missing_eos_penalty=None, normalize_reward=False, center_reward=False)
    assert_close(shape_scores(torch.tensor([2.0, 0.0]), later, off, RunningMoments(), gather), torch.tensor([2.0, 0.0]))
