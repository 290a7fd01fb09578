"""The EMA actor in PPO checkpoints: `checkpoint-N/ema.safetensors`, taken back bit for bit on resume.

In memory, no engines: the stage's own save (stages/ppo/state.py) and the loop's EMA (stages/ppo/trainer.py).
The EMA's arithmetic and its `final/ema/` model are checked in a real run (tests/test_capabilities_ppo.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from stages.ppo import state as ckpt
from stages.ppo.trainer import EMA


def actor(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False)).to(dtype)
    model[1].weight.requires_grad_(False)  # frozen: not averaged
    return model


def save(tmp_path, ema: EMA):
    return ckpt.save(tmp_path, 1, {}, {"step": 1}, rank=0, keep=1, barrier=lambda: None, tensors={"ema": ema.shadow})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_is_saved_beside_the_checkpoint_and_restored_bit_for_bit(tmp_path, dtype):
    model = actor(dtype)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) / 3)
    ema.update(model)

    path = save(tmp_path, ema)
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "rlhf_complete.json", "rng_rank0.json"]
    assert json.loads((path / "rlhf_complete.json").read_text()) == {"step": 1}  # no weights in the JSON

    resumed = EMA(actor(dtype), decay=0.9)  # a resumed run starts from its initial actor, then loads
    resumed.load(ckpt.load_tensors(path, "ema"), path)
    assert resumed.shadow.keys() == ema.shadow.keys() == {"0.weight", "0.bias"}
    for name, value in ema.shadow.items():
        assert resumed.shadow[name].dtype == dtype and torch.equal(resumed.shadow[name], value), name
    assert not torch.equal(resumed.shadow["0.weight"], actor(dtype)[0].weight)  # it moved away from the start


def test_a_checkpoint_without_an_ema_has_no_file_and_an_ema_of_other_weights_is_refused(tmp_path):
    path = ckpt.save(tmp_path, 1, {}, {"step": 1}, rank=0, keep=1, barrier=lambda: None)
    assert ckpt.load_tensors(path, "ema") is None

    ema = EMA(actor(torch.float32), decay=0.9)
    saved = dict(ema.shadow)
    saved["1.weight"] = torch.zeros(2, 4)  # e.g. a LoRA run's EMA into a full actor
    with pytest.raises(UserError, match=r"its EMA holds other weights than this actor's trainable ones"):
        ema.load(saved, path)
