"""The SFT and reward stages: end to end through the real `rlhf` CLI on the tiny config (one rank, and a LoRA
reward model on two ZeRO-3 ranks), the LoRA merge against base + adapter, the reward metrics against hand-computed
numbers, and bad data stopping a stage before training with the file, row and field named.

One pretraining run is shared by the module (fixture `pretrained`); every other run gets its own
run dir and takes the pretrained model either through a copy of `pretrain/` (the manifest hand-off)
or as an explicit `<stage>.input`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.config import LoraSection
from pipeline.errors import DataError, UserError
from tests.conftest import TINY, communicate

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


ZERO3_TWO_RANKS = ("deepspeed.num_gpus=2", "deepspeed.config=zero3")


@dataclass
class Result:
    returncode: int
    output: str  # stdout and stderr together: a stage's own errors arrive through the launcher's stdout


def rlhf(*args: str | Path, timeout: int = 900) -> Result:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    returncode, stdout, stderr = communicate(args, env, timeout)
    return Result(returncode, stdout + stderr)


def run_ok(run_dir: Path, stages: str, *overrides: str) -> Result:
    result = rlhf("run", TINY, "--run-dir", run_dir, "--stages", stages, *overrides)
    assert result.returncode == 0, f"rlhf run --stages {stages} failed:\n{result.output[-6000:]}"
    return result


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())


def with_pretrain(pretrained: Path, run_dir: Path) -> Path:
    """A fresh run dir holding a copy of the shared pretraining result, so SFT finds it by manifest."""
    shutil.copytree(pretrained / "pretrain" / "final", run_dir / "pretrain" / "final")
    return run_dir


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrained")
    run_ok(run_dir, "pretrain")
    return run_dir


# end to end through the CLI


def test_pretrain_sft_reward_on_one_rank(pretrained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run_dir = with_pretrain(pretrained, tmp_path / "run")
    run_ok(run_dir, "sft,reward")

    sft = manifest(run_dir, "sft")
    assert sft["status"] == "complete"
    assert sft["inputs"]["model"]["path"] == str(run_dir / "pretrain" / "final")
    assert sft["inputs"]["model"]["from_stage"] == "pretrain"
    assert math.isfinite(sft["metrics"]["eval_loss"]) and sft["metrics"]["steps"] == 4
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "final")
    assert policy.config.vocab_size > 0

    reward = manifest(run_dir, "reward")
    assert reward["inputs"]["model"]["path"] == str(run_dir / "sft" / "final")
    metrics = reward["metrics"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert math.isfinite(metrics["eval_margin"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["eval_pairs"] > 0 and metrics["identical_pairs"] == 0
    scorer = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "final")
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id is not None


def test_lora_reward_on_two_zero3_ranks_is_merged_on_rank_0(pretrained, tmp_path):
    """LoRA's adapters and score head, trained on two ZeRO-3 ranks, merged on rank 0 after training. (Full
    SFT and reward training on two ZeRO-3 ranks is tests/test_sharding.py's, weights against one rank's.)"""
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "run"
    run_ok(run_dir, "reward", f"reward.input={pretrained / 'pretrain' / 'final'}", *ZERO3_TWO_RANKS,
           "reward.lora={r: 4}")
    reward = manifest(run_dir, "reward")
    assert reward["world_size"] == 2
    assert {"eval_accuracy", "eval_margin", "eval_loss"} <= set(reward["metrics"])
    scorer = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "final")
    assert scorer.config.num_labels == 1
    assert not any("lora" in name for name, _ in scorer.named_parameters())
    assert reward["lora"]["merged"] is True
    assert (run_dir / "reward" / "final" / "adapter" / "adapter_model.safetensors").exists()


# bad data stops the stage before training


@pytest.mark.parametrize(
    "stage, split, rows, expected",
    [
        ("sft", "train", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
         "row 2: field 'completion' is missing"),
        ("reward", "train", [{"prompt": "p", "chosen": "x", "rejected": "y"}] * 2
         + [{"prompt": "", "chosen": "x", "rejected": "y"}],
         "row 3: field 'prompt' is an empty string"),
        ("sft", "eval", [], "file is empty"),
    ],
    ids=["missing-field", "empty-string", "empty-file"],
)
def test_bad_data_stops_the_stage_naming_file_row_and_field(pretrained, tmp_path, stage, split, rows, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_dir = tmp_path / "run"
    result = rlhf("run", TINY, "--run-dir", run_dir, "--stages", stage,
                  f"{stage}.input={pretrained / 'pretrain' / 'final'}", f"{stage}.data.{split}={bad}")
    assert result.returncode == 2, result.output[-4000:]
    assert str(bad) in result.output and expected in result.output, result.output[-4000:]
    assert not (run_dir / stage / "final").exists()
    assert not list((run_dir / stage).glob("checkpoint-*"))


# LoRA merge, reward maths, data shapes (no launch)


def _tiny_llama(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    return (LlamaForCausalLM if kind == "causal_lm" else LlamaForSequenceClassification)(config).eval()


@pytest.mark.parametrize("kind", ["causal_lm", "seq_cls"])
def test_lora_merge_gives_base_plus_adapter_logits(tmp_path, kind):
    from peft import get_peft_model

    from pipeline.lora import load_merged, lora_config

    base = _tiny_llama(kind)
    base.save_pretrained(tmp_path / "base")
    ids = torch.randint(1, 64, (3, 12))
    with torch.no_grad():
        base_logits = base(ids).logits
    model = get_peft_model(base, lora_config(LoraSection(r=4, alpha=8), kind)).eval()
    with torch.no_grad():  # trained-looking adapters: fresh ones (lora_B = 0) would make the test vacuous
        for name, param in model.named_parameters():
            if param.requires_grad:  # lora_A/lora_B, and the reward model's own copy of the score head
                param.normal_(0.0, 0.2)
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")

    merged = load_merged(str(tmp_path / "base"), tmp_path / "adapter", kind).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5)


def test_lora_refuses_unknown_target_modules():
    from pipeline.lora import check_targets

    with pytest.raises(UserError, match=r"sft\.lora\.target_modules: .*'qkv'.*q_proj"):
        check_targets(_tiny_llama("causal_lm"), LoraSection(target_modules=["q_proj", "qkv"]), "sft.lora")


def test_pairwise_metrics_against_hand_numbers():
    from stages.reward import pairwise_metrics

    # margins 1, 0 (a tie is not a win), -2
    got = pairwise_metrics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0]))
    loss = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert got["eval_accuracy"] == pytest.approx(1 / 3)
    assert got["eval_margin"] == pytest.approx(-1 / 3)
    assert got["eval_loss"] == pytest.approx(loss)  # 1.04445


def test_identical_pairs_are_counted():
    from datasets import Dataset

    from stages.reward import identical_pairs

    rows = Dataset.from_list([{"chosen": "a", "rejected": "a"}, {"chosen": "a", "rejected": "b"},
                              {"chosen": "c", "rejected": "c"}])
    assert identical_pairs(rows) == 2


def test_reward_refuses_a_classifier_with_several_outputs(tmp_path):
    from transformers import LlamaConfig

    from stages.reward import check_input_head

    config = LlamaConfig(num_labels=3, architectures=["LlamaForSequenceClassification"])
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="3 outputs"):
        check_input_head(str(tmp_path))
    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)  # num_labels defaults to 2
    check_input_head(str(tmp_path))


def test_sft_rows_become_what_the_trainer_takes():
    from datasets import Dataset

    from pipeline.data import StageRows
    from stages.sft import training_rows
    from tests.standins import make_tokenizer

    tokenizer = make_tokenizer("qwen2")
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}]
    encoded = training_rows(StageRows(Dataset.from_list([{"messages": chat}]), "messages", "x.jsonl"), tokenizer)
    trained = [t for t, m in zip(encoded[0]["input_ids"], encoded[0]["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == "a<|im_end|>\n"
    plain = training_rows(StageRows(Dataset.from_list([{"prompt": "p", "completion": "c"}]), "prompt_completion",
                                    "x.jsonl"), tokenizer)
    assert plain[0] == {"prompt": [{"role": "user", "content": "p"}],
                        "completion": [{"role": "assistant", "content": "c"}]}
    # a template that does not render the assistant turn as a prefix extension leaves nothing to learn
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"x\.jsonl: row 1: field 'messages' has no assistant turn"):
        training_rows(StageRows(Dataset.from_list([{"messages": chat}]), "messages", "x.jsonl"), tokenizer)
