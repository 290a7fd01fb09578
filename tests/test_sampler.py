"""The KV-cache sampler (pipeline/generation.py): left padding, position ids and the response mask by hand,
top-p and min_new_tokens on stand-in models, and near-greedy sampling against transformers' `generate` on
the tiny Llama of tests/test_ppo_stage.py and a GPT-2 (no launcher, models in memory)."""

from __future__ import annotations

import pytest
import torch

from pipeline.generation import (ended_with_eos, left_pad, position_ids_from_mask, response_mask, sample, sample_token,
                                 stop_token_ids)
from tests.test_ppo_stage import tiny  # noqa: F401 (fixture)


def test_left_pad_hand_example():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_position_ids_start_at_each_rows_first_real_token():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]


def test_response_mask_runs_through_the_first_eos_only():
    eos = 2
    responses = torch.tensor([
        [5, 6, 2, 0, 0],  # EOS at 2: keep 0..2
        [2, 7, 2, 7, 7],  # EOS first: keep only it, the second EOS is after the end
        [5, 6, 7, 8, 9],  # no EOS: keep everything
    ])
    assert response_mask(responses, eos).tolist() == [
        [1.0, 1.0, 1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ]


def test_top_p_keeps_the_top_token_even_below_its_mass():
    # softmax([3, 2, 1, 0]) = 0.644, 0.237, 0.087, 0.032: the top token alone already holds more than top_p
    logits = torch.tensor([[1.0, 3.0, 0.0, 2.0]]).repeat(200, 1)
    generator = torch.Generator().manual_seed(0)
    assert sample_token(logits, temperature=1.0, top_p=0.01, generator=generator).unique().tolist() == [1]
    # top_p=0.7: mass before token 3 is 0.644 < 0.7, so it stays; before token 0 it is 0.881 >= 0.7: dropped
    drawn = sample_token(logits, temperature=1.0, top_p=0.7, generator=generator)
    assert set(drawn.unique().tolist()) == {1, 3}


def test_sampled_tokens_follow_the_softmax_and_never_a_masked_token():
    # softmax([1, 3, 0, 2]) = 0.087, 0.644, 0.032, 0.237; the masked first and last entries have probability 0
    inf = float("-inf")
    logits = torch.tensor([[inf, 1.0, 3.0, 0.0, 2.0, inf]]).repeat(40_000, 1)
    drawn = sample_token(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=6).double() / len(drawn)
    assert counts[0] == 0 and counts[5] == 0
    # 40,000 draws: the standard error of each share is below 0.0025
    torch.testing.assert_close(counts[1:5], torch.tensor([0.0871, 0.6439, 0.0321, 0.2369], dtype=torch.double),
                               atol=0.008, rtol=0)
    # temperature 2 flattens: softmax([0.5, 1.5, 0, 1]) = 0.186, 0.506, 0.113, 0.307 (rounded)
    drawn = sample_token(logits, temperature=2.0, top_p=1.0, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(drawn, minlength=6).double() / len(drawn)
    expected = torch.tensor([0.5, 1.5, 0.0, 1.0]).softmax(-1).double()
    torch.testing.assert_close(counts[1:5], expected, atol=0.008, rtol=0)


class _EosFirst(torch.nn.Module):
    """A fake LM whose every next-token distribution puts almost all mass on EOS (id 2)."""

    def forward(self, input_ids, past_key_values=None, **kwargs):
        from types import SimpleNamespace

        logits = torch.zeros(*input_ids.shape, 5)
        logits[..., 2] = 20.0
        return SimpleNamespace(logits=logits)


def test_min_new_tokens_holds_eos_back_then_lets_it_through():
    ids, mask = torch.tensor([[3, 4], [0, 4]]), torch.tensor([[1, 1], [0, 1]])
    generator = torch.Generator().manual_seed(0)
    out = sample(_EosFirst(), ids, mask, max_new_tokens=8, eos_id=2, pad_id=0, generator=generator, min_new_tokens=3)
    assert out.shape == (2, 4)  # three non-EOS tokens, then EOS (near-certain) on both rows, then it stops
    assert (out[:, :3] != 2).all() and (out[:, 3] == 2).all()
    free = sample(_EosFirst(), ids, mask, max_new_tokens=8, eos_id=2, pad_id=0, generator=generator)
    assert free.tolist() == [[2], [2]]
    # sampled in inference mode, handed out as an ordinary tensor the update's autograd may keep
    assert not out.is_inference() and not free.is_inference()


class _TwoStops(torch.nn.Module):
    """A fake LM that puts its mass on id 3 on the first row and id 4 on the second, both stop ids."""

    def forward(self, input_ids, past_key_values=None, **kwargs):
        from types import SimpleNamespace

        logits = torch.zeros(*input_ids.shape, 6)
        logits[0, ..., 3] = 20.0
        logits[1, ..., 4] = 20.0
        return SimpleNamespace(logits=logits)


def test_a_response_ends_at_any_of_several_stop_ids():
    ids, mask = torch.tensor([[1, 1], [1, 1]]), torch.ones(2, 2, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    out = sample(_TwoStops(), ids, mask, max_new_tokens=6, eos_id=(3, 4), pad_id=0, generator=generator,
                 min_new_tokens=2)
    # ids 3 and 4 are both held back for two tokens (the rows draw 0, 1, 2 or 5), then each row stops on its own
    assert out.shape == (2, 3) and out[:, 2].tolist() == [3, 4]
    assert not torch.isin(out[:, :2], torch.tensor([3, 4])).any()
    only_three = sample(_TwoStops(), ids, mask, max_new_tokens=4, eos_id=3, pad_id=0, generator=generator)
    assert only_three[0].tolist() == [3, 0, 0, 0] and only_three[1].tolist() == [4, 4, 4, 4]  # 4 is no stop here
    responses = torch.tensor([[5, 4, 3, 5], [5, 5, 3, 4], [5, 5, 5, 5]])
    assert response_mask(responses, (3, 4)).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert ended_with_eos(responses, (3, 4)).tolist() == [True, True, False]
    assert ended_with_eos(responses, 4).tolist() == [True, True, False]


def test_stop_ids_are_the_tokenizers_eos_and_every_eos_of_the_generation_config():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    tokenizer = SimpleNamespace(eos_token_id=7)
    assert stop_token_ids(tokenizer) == (7,)
    # as Qwen2.5-Instruct ships: generation_config lists <|im_end|> and <|endoftext|>
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[9, 7]))
    assert stop_token_ids(tokenizer, model) == (7, 9)
    single = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=8))
    assert stop_token_ids(tokenizer, single) == (7, 8)
    engine = SimpleNamespace(module=model)  # a DeepSpeed engine around the model
    assert stop_token_ids(tokenizer, engine) == (7, 9)


def _gpt2_like(tokenizer):
    """A model with absolute position embeddings: shifted position ids change its outputs (RoPE's do not)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


def _sharpened(model, scale: float = 16.0):
    """A copy with every matrix scaled up: at init a tiny Llama's attention barely moves its argmax, so
    attending to padding would go unnoticed; scaled, each token depends on its context."""
    import copy

    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for p in sharp.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return sharp


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sample_near_greedy_matches_generate_on_each_prompt_alone(tiny, arch):
    """Left padding, position ids and the KV cache together: a padded batch decodes like each prompt alone.

    Llama (RoPE) sees only relative positions, so it checks the masks and the cache; GPT-2's absolute
    position embeddings also catch position ids that count from the padding instead of the prompt.
    """
    model = _sharpened(tiny.policy) if arch == "llama" else _gpt2_like(tiny.tokenizer)
    tok = tiny.tokenizer
    texts = ["A fine", "This movie was a waste of two", "I rented it because of all the controversy and"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 3  # three widths, so two rows are left-padded
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = sample(model, ids, mask, max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 temperature=1e-4, generator=torch.Generator().manual_seed(0))
    keep = response_mask(out, tok.eos_token_id).bool()
    for i, prompt in enumerate(prompts):
        x = torch.tensor([prompt])
        expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        assert out[i][keep[i]].tolist() == expected.tolist(), f"row {i} ({len(prompt)} prompt tokens)"
