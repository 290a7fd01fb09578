"""The actor's update step on a plain module: what it puts through autograd, and the temperature."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stages.ppo import maths
from stages.ppo import update as ppo_update
from stages.ppo.experience import Rollout, response_logits, response_logprobs

VOCAB, ROWS, PROMPT, RESPONSE = 64, 3, 5, 4


@pytest.fixture
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=32))


def rollout() -> Rollout:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(ROWS, RESPONSE)
    mask[0, 2:] = 0.0  # one response ended early
    return Rollout(torch.randint(0, VOCAB, (ROWS, PROMPT), generator=g), torch.ones(ROWS, PROMPT, dtype=torch.long),
                   torch.randint(0, VOCAB, (ROWS, RESPONSE), generator=g), mask, torch.ones(ROWS, dtype=torch.bool))


class Engine(torch.nn.Module):
    """The two calls actor_update makes on a DeepSpeed engine; `step` keeps the gradients instead of stepping."""

    def __init__(self, module):
        super().__init__()
        self.module, self.grads = module, None

    def forward(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}
        self.module.zero_grad(set_to_none=True)


def test_response_logits_are_over_the_temperature_and_untouched_at_one(model):
    r = rollout()
    with torch.no_grad():
        raw = response_logits(model, r)
        assert raw.shape == (ROWS, RESPONSE, VOCAB)
        assert torch.equal(response_logits(model, r, 1.0), raw)
        assert torch.allclose(response_logits(model, r, 0.5), raw * 2.0)


def test_scoring_log_probs_row_by_row_are_the_whole_batch_ones_exactly(model):
    r = rollout()
    with torch.no_grad():
        whole = maths.logprobs_from_logits(response_logits(model, r, 0.7), r.responses)
    assert torch.equal(response_logprobs(model, r, 0.7), whole)
    assert not response_logprobs(model, r).requires_grad


def test_logged_entropy_stays_outside_autograd_unless_the_loss_has_it(model, monkeypatch):
    """With entropy_coef 0 the entropy is only logged: computed without autograd (its [b, T, V] softmax and
    log-softmax are not held through the backward), with the same value, and the gradient is the policy
    loss's alone; with a coefficient it is in the graph and changes the gradient."""
    r, advantages = rollout(), torch.linspace(-1.0, 1.0, ROWS * RESPONSE).reshape(ROWS, RESPONSE)
    grad_enabled = []
    entropy_from_logits = maths.entropy_from_logits

    def recording(logits):
        grad_enabled.append(torch.is_grad_enabled())
        return entropy_from_logits(logits)

    monkeypatch.setattr(maths, "entropy_from_logits", recording)

    def update(entropy_coef: float):
        engine = Engine(model)
        cfg = SimpleNamespace(temperature=0.7, clip_range=0.2, loss_agg="token_mean", entropy_coef=entropy_coef,
                              kl_in="reward")
        stats, _ = ppo_update.actor_update(SimpleNamespace(actor=engine), r, None, advantages, cfg, None, 0.0)
        return stats, engine.grads

    stats, grads = update(0.0)
    assert grad_enabled and not any(grad_enabled)
    grad_enabled.clear()
    logits = response_logits(model, r, 0.7)
    logprobs = maths.logprobs_from_logits(logits, r.responses)
    pg_loss = maths.policy_loss(logprobs, logprobs.detach(), advantages, r.mask, 0.2, "token_mean")[0]
    expected = torch.autograd.grad(pg_loss, [p for _, p in model.named_parameters()], allow_unused=True)
    for (name, _), g in zip(model.named_parameters(), expected):
        if g is not None:
            assert torch.allclose(grads[name], g, atol=1e-7), name
    with torch.no_grad():
        assert stats["entropy"] == float(maths.masked_mean(entropy_from_logits(logits), r.mask))  # row by row, same value

    _, with_bonus = update(0.5)
    assert grad_enabled == [True]
    assert any(not torch.allclose(with_bonus[n], grads[n], atol=1e-6) for n in grads)
