"""pipeline.models: loading swaps GPT-2's eight-op tanh GELU for PyTorch's fused kernel of the same function."""

from __future__ import annotations

import torch

from pipeline.models import fuse_tanh_gelu, load_model


def gpt2(activation: str = "gelu_new"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, activation_function=activation,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_load_model_fuses_the_tanh_gelu_and_keeps_outputs_and_gradients(tmp_path):
    from transformers.activations import GELUTanh, NewGELUActivation

    original = gpt2()
    original.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert not any(isinstance(m, NewGELUActivation) for m in loaded.modules())
    assert sum(isinstance(m, GELUTanh) for m in loaded.modules()) == 2  # one per block
    assert loaded.config.activation_function == "gelu_new"  # the checkpoint's config is not rewritten

    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    for model in (original, loaded):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(original.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_other_activations_are_left_alone():
    exact = gpt2("gelu")
    before = [type(m) for m in exact.modules()]
    assert [type(m) for m in fuse_tanh_gelu(exact).modules()] == before
