"""A user's own checkpoint of each common causal-LM family through SFT -> reward -> PPO -> eval, with the
dataset schemas users bring, on CPU.

The orchestrator runs as `rlhf run` does (preflight, manifests, hand-offs, the end-of-run evaluation); only
DeepSpeed's launcher is replaced by the worker's `run_stage` in this process (tests/inprocess.py), one rank, so four
families cost their training and not twelve process start-ups. The launcher path itself is what every other
end-to-end test (and the example configs' test) runs.

Each family is a tiny random-weight model built with `from_config` and saved with `save_pretrained`, with a
tokenizer that has the family's special tokens and chat template (tests/standins.py). Qwen2 and Gemma are
stored in bf16, as those families ship, and must train in fp32 here. The schemas differ per family so that
every format goes through its stage end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests import standins
from tests.inprocess import launcher_in_process

pytestmark = pytest.mark.slow  # trains every stage


@pytest.fixture
def in_process_launcher():
    with launcher_in_process():
        yield


def messages_prompt_rows(n: int, offset: int = 0):
    """PPO prompts as `messages` with a system turn (a trailing assistant turn would be dropped)."""
    return [{"messages": [{"role": "system", "content": "You review films."}, *row["messages"][:1]]}
            for row in standins.ultrachat_rows(n, offset)]


def strings(rows, *fields):
    """Rows reduced to string fields: the first user turn as `prompt`, the answers as plain text."""
    out = []
    for row in rows:
        turns = row["chosen"]
        out.append({"prompt": turns[0]["content"], "chosen": turns[1]["content"],
                    "rejected": row["rejected"][1]["content"]} if "chosen" in row else row)
    return [{k: r[k] for k in fields} for r in out]


def write_data(family: str, root: Path) -> dict[str, dict[str, str]]:
    """Each stage's train/eval files for a family, in the schemas that family's test covers."""
    def pair(name: str, make, n=16, n_eval=4, writer=standins.write_jsonl, suffix="jsonl"):
        train, held = make(n), make(n_eval, offset=100)
        if writer is None:  # parquet
            import datasets
            for split, rows in (("train", train), ("eval", held)):
                datasets.Dataset.from_list(rows).to_parquet(str(root / f"{name}-{split}.parquet"))
            return {"train": str(root / f"{name}-train.parquet"), "eval": str(root / f"{name}-eval.parquet")}
        return {"train": str(writer(root / f"{name}-train.{suffix}", train)),
                "eval": str(writer(root / f"{name}-eval.{suffix}", held))}

    uf = standins.ultrafeedback_binarized_rows
    if family == "llama":  # multi-turn messages, Anthropic HH, messages prompts with a system turn
        return {"sft": pair("sft", standins.ultrachat_rows), "reward": pair("rm", standins.hh_rows),
                "ppo": pair("ppo", messages_prompt_rows)}
    if family == "mistral":  # prompt/completion strings, explicit-prompt string pairs, string prompts (parquet)
        def pc(n, offset=0):
            return [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
                    for r in standins.ultrachat_rows(n, offset)]
        return {"sft": pair("sft", pc), "reward": pair("rm", lambda n, offset=0: strings(uf(n, offset), "prompt",
                                                                                           "chosen", "rejected")),
                "ppo": pair("ppo", lambda n, offset=0: [{"prompt": r["prompt"]} for r in pc(n, offset)], writer=None)}
    if family == "gpt2":  # no chat template: plain text SFT, prompt-less string pairs, string prompts
        def text(n, offset=0):
            return [{"text": t} for t in standins.review_texts(offset + n)[offset:]]
        return {"sft": pair("sft", text), "reward": pair("rm", lambda n, offset=0: strings(uf(n, offset), "chosen",
                                                                                           "rejected")),
                "ppo": pair("ppo", lambda n, offset=0: strings(uf(n, offset), "prompt"))}
    if family == "gemma":  # prompt/completion as turns, whole-conversation pairs, prompt turns
        def pc_turns(n, offset=0):
            return [{"prompt": r["messages"][:1], "completion": r["messages"][1:2]} for r in standins.ultrachat_rows(n, offset)]
        return {"sft": pair("sft", pc_turns), "reward": pair("rm", uf), "ppo": pair("ppo", standins.ultrafeedback_prompt_rows)}
    raise ValueError(family)


def run_config(family: str, model: Path, data: dict[str, dict[str, str]]) -> dict:
    small = dict(max_steps=2, batch_size=2, lr=1.0e-3, logging_steps=1)
    return {
        "run": {"name": f"arch-{family}", "seed": 0},
        "deepspeed": {"config": "zero0", "num_gpus": 1},
        "tracking": "none",
        "pretrain": {"enabled": False},
        "sft": {"input": str(model), "data": data["sft"], "max_length": 256, **small},
        "reward": {"data": data["reward"], "max_length": 256, **small},
        "ppo": {"data": data["ppo"], "rollout_batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1,
                "max_new_tokens": 6, "max_prompt_length": 160, "max_steps": 1, "lr": 1.0e-4},
        "eval": {"num_prompts": 4, "max_new_tokens": 6},
    }


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())


@pytest.mark.parametrize("family, stored", [("llama", "float32"), ("mistral", "float32"), ("gpt2", "float32"),
                                            ("gemma", "bfloat16")])
def test_family_runs_every_stage(tmp_path, in_process_launcher, family, stored):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.orchestrator import run_pipeline

    model = standins.save_checkpoint(family, tmp_path / "model", dtype=stored)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(family, model, write_data(family, tmp_path))))
    run_dir = tmp_path / "run"
    run_pipeline(str(config), [], None, str(run_dir))

    for stage in ("sft", "reward", "ppo"):
        assert manifest(run_dir, stage)["status"] == "complete"
    assert AutoConfig.from_pretrained(run_dir / "ppo" / "final").model_type == family
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "final")
    reward = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "final")
    assert reward.config.num_labels == 1 and reward.config.pad_token_id is not None
    # trained in fp32 whatever the stored dtype: the hand-offs hold fp32 weights
    assert {p.dtype for p in policy.parameters()} == {torch.float32}

    tokenizer = standins.make_tokenizer(family)
    sft_example = manifest(run_dir, "sft")["example"]
    ppo_prompt = manifest(run_dir, "ppo")["prompt_example"]
    if family in standins.GENERATION_STOPS:  # every stop the checkpoint shipped survives to PPO's policy and its sampler
        from pipeline.generation import stop_token_ids

        shipped = tokenizer.convert_tokens_to_ids(standins.GENERATION_STOPS[family])
        assert set(shipped) <= set(stop_token_ids(tokenizer, policy)) and len(shipped) == 2
    if family == "llama":  # the loss is on both assistant turns, with their end-of-turn marker, and nothing else
        row = standins.ultrachat_rows(1)[0]["messages"]
        assert sft_example["trained"] == f"{row[1]['content']}<|eot_id|>{row[3]['content']}<|eot_id|>"
        assert ppo_prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou review films."
                                     "<|eot_id|><|start_header_id|>user<|end_header_id|>")
        assert ppo_prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    elif family == "gemma":
        assert ppo_prompt.startswith("<bos><start_of_turn>user\n") and ppo_prompt.endswith("<start_of_turn>model\n")
        assert sft_example["trained"].endswith("<end_of_turn>\n") and "<start_of_turn>user" not in sft_example["trained"]
    elif family == "mistral":
        assert ppo_prompt.startswith("<s>[INST] ") and ppo_prompt.endswith(" [/INST]")
        assert sft_example["trained"].endswith("</s>") and "[INST]" not in sft_example["trained"]
    else:  # GPT-2 has no chat template: prompts as they are, plain text trained on every token
        assert "<|im_start|>" not in ppo_prompt and ppo_prompt == tokenizer.decode(tokenizer(ppo_prompt)["input_ids"])
        assert sft_example["trained"] == sft_example["text"]

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["temperatures"]) == {"0.7", "1"}
    assert results["temperatures"]["0.7"]["samples"]["ppo"], "the evaluation sampled the trained policy"
