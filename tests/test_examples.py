"""The shipped example configs run end to end as a user would run them without the hub: `rlhf run` on the
config file with dotted overrides only, pointing the model id at a local checkpoint and each hub dataset at a
local copy in that dataset's schema (a folder laid out like the hub repository, so the config's splits stay).

Stand-ins (tests/standins.py): a tiny Qwen2 checkpoint stored in bf16 with Qwen2.5's ChatML template;
ultrachat_200k (multi-turn `messages`, splits train_sft/test_sft), ultrafeedback_binarized (chosen/rejected
conversations) and ultrafeedback-prompt (`prompt` as a list of turns); a second tiny Qwen2 classifier as
the gold judge. The remaining overrides only shrink sizes to CPU scale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import standins
from tests.conftest import ROOT, communicate

pytestmark = pytest.mark.slow  # launches the CLI

RUN_TIMEOUT_S = 1200
SHRINK = {  # CPU-sized steps and lengths; nothing else about the example changes
    "sft": ["max_steps=2", "batch_size=2", "grad_accum=1", "max_length=256", "warmup_steps=0", "save_steps=null",
            "eval_steps=null", "data.max_samples=16"],
    "reward": ["max_steps=2", "batch_size=2", "grad_accum=1", "max_length=256", "save_steps=null"],
    "ppo": ["max_steps=1", "rollout_batch_size=4", "minibatch_size=4", "max_new_tokens=6", "max_prompt_length=128",
            "save_steps=null"],
}


@pytest.fixture(scope="module")
def standin_hub(tmp_path_factory) -> dict[str, Path]:
    """Local copies of the example's model, datasets and gold judge."""
    import torch
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("hub")
    model = standins.save_checkpoint("qwen2", root / "Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    judge = root / "gold-judge"
    torch.manual_seed(7)
    config = standins.model_config("qwen2", standins.make_tokenizer("qwen2"))
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.save_pretrained(judge)
    standins.make_tokenizer("qwen2").save_pretrained(judge)
    return {
        "model": model, "judge": judge,
        "ultrachat": standins.write_hub_folder(root / "ultrachat_200k", {
            "train_sft": standins.ultrachat_rows(16), "test_sft": standins.ultrachat_rows(4, 100)}),
        "ultrafeedback": standins.write_hub_folder(root / "ultrafeedback_binarized", {
            "train": standins.ultrafeedback_binarized_rows(16), "test": standins.ultrafeedback_binarized_rows(4, 100)}),
        "prompts": standins.write_hub_folder(root / "ultrafeedback-prompt", {
            "train": standins.ultrafeedback_prompt_rows(16), "test": standins.ultrafeedback_prompt_rows(4, 100)}),
    }


def overrides(hub: dict[str, Path], ranks: int) -> list[str]:
    out = [f"sft.input={hub['model']}", f"deepspeed.num_gpus={ranks}", f"eval.judge={hub['judge']}",
           "eval.num_prompts=4"]
    for stage, data in (("sft", "ultrachat"), ("reward", "ultrafeedback"), ("ppo", "prompts")):
        out += [f"{stage}.data.train={hub[data]}", f"{stage}.data.eval={hub[data]}"]
    return out + [f"{stage}.{item}" for stage, items in SHRINK.items() for item in items]


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())


@pytest.mark.parametrize("example, ranks", [("qwen2.5-0.5b-zero3", 2), ("qwen2.5-0.5b-lora", 1)])
def test_example_config_runs_with_local_standins(tmp_path, standin_hub, example, ranks):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["run", ROOT / "configs" / "examples" / f"{example}.yaml", "--run-dir", run_dir,
            *overrides(standin_hub, ranks)]
    code, out, _ = communicate(args, env, RUN_TIMEOUT_S, merge_output=True)
    assert code == 0, out[-4000:]

    for stage in ("sft", "reward", "ppo"):
        m = manifest(run_dir, stage)
        assert m["status"] == "complete" and m["world_size"] == ranks
    AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "final")
    AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "final")
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "final")
    # Qwen2.5-Instruct's two stops (<|im_end|>, <|endoftext|>) survive SFT and PPO: the policy stops on either
    assert set(policy.generation_config.eos_token_id) == set(
        standins.make_tokenizer("qwen2").convert_tokens_to_ids(standins.GENERATION_STOPS["qwen2"]))

    # ultrachat's conversations went through ChatML with the loss on the assistant turns only
    first = standins.ultrachat_rows(16)
    sft = manifest(run_dir, "sft")["example"]
    assert sft["text"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>user" not in sft["trained"] and sft["trained"].endswith("<|im_end|>\n")
    assert any(sft["trained"].startswith(row["messages"][1]["content"]) for row in first)
    # ultrafeedback-prompt's turn lists were rendered as user turns, ending in the assistant generation prompt
    prompt = manifest(run_dir, "ppo")["prompt_example"]
    assert "<|im_start|>user\nWhat do you think of this film?" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # the gold judge scored the held-out prompts of the test split
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["settings"]["judge"] == str(standin_hub["judge"])
    held_out = {row["prompt"][0]["content"] for row in standins.ultrafeedback_prompt_rows(4, 100)}
    assert {s["prompt"] for s in results["temperatures"]["0.7"]["samples"]["ppo"]} <= held_out
