"""Faults on purpose, through the real `rlhf` command and real ranks:

1. PPO on two ZeRO-3 ranks where every response of rank 0 ends at once (EOS first) and every response of
   rank 1 runs to ppo.max_new_tokens. The policy is built so that this is certain, not likely: a bigram
   model (no attention or MLP output, so each next token depends only on the current one) whose
   '.' is followed by EOS and whose '!' by '!' again, and whose tokenizer has no chat template, so a prompt
   ends with its own last character. The prompts are written so that rank 0 is dealt only those ending
   in '.' and rank 1 only those ending in '!'. The ranks run with TORCH_DISTRIBUTED_DEBUG=DETAIL, under
   which every collective first checks that all ranks call the same one with the same shapes (and fails
   the stage if not); each rank also logs each collective it enters, and the test compares the two lists.
   A hang fails the test at its timeout.
2. The end-of-run evaluation of that same run: rank 0 judges while rank 1 waits, and the results are in
   the stage's manifest. The run's process group times out after one minute (DEEPSPEED_TIMEOUT=1; the
   default is 10) and rank 0 finishes FINISH_S seconds later than it would (RLHF_TEST_FAULT), as a long
   evaluation of a big model would: rank 1's wait must outlast the group's timeout.
3. `rlhf resume` itself: `--stage ppo --from RUN/ppo/checkpoint-N` continues from step N (and redoes the
   next step exactly as it was first done); after a config change the same command is refused with one
   line, and with `--force` it resumes across the change.

The kill in 3 is exact: RLHF_TEST_FAULT stops the ranks right after the checkpoint (tests/conftest.py).
The models are built here in seconds, not trained: nothing tested depends on what they learned.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import RLHF, communicate, kill_at_checkpoint

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier

TIMEOUT_S = 900  # generous: a loaded 2-core machine runs a stage several times slower than an idle one
STOP, GO = "It was fine.", "It was fine!"  # '.' -> EOS; '!' -> '!' -> ... (see `models`)
MAX_NEW_TOKENS = 8


@dataclass
class Models:
    policy: Path  # a tiny random Llama with the chat template: ppo.input of the resume test
    uneven: Path  # the bigram policy of the module docstring
    reward: Path  # a one-output sequence classifier: ppo.reward_model (and the critic's start)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline.config import ModelArch
    from pipeline.models import build_model, train_tokenizer
    from pipeline.movie_reviews import load_reviews

    root = tmp_path_factory.mktemp("models")
    made = Models(root / "policy", root / "uneven", root / "reward")
    tokenizer = train_tokenizer([r.text for r in load_reviews()[:300]], vocab_size=400)
    arch = ModelArch(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
    policy = build_model(arch, tokenizer, seed=0)
    policy.save_pretrained(made.policy)
    tokenizer.save_pretrained(made.policy)
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(made.policy, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(made.reward)
    tokenizer.save_pretrained(made.reward)

    stop, go = (tokenizer(text, add_special_tokens=False)["input_ids"][-1] for text in (STOP, GO))
    with torch.no_grad():
        for layer in policy.model.layers:  # the residual stream is the current token's embedding alone
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = policy.get_input_embeddings().weight  # tied to the LM head: logit(j) = <norm(emb[x]), emb[j]>
        emb.zero_()
        emb[tokenizer.eos_token_id, 0], emb[stop, 0], emb[go, 1] = 100.0, 10.0, 10.0  # margins of 50+ nats
    tokenizer.chat_template = None
    policy.save_pretrained(made.uneven)
    tokenizer.save_pretrained(made.uneven)
    return made


def write_config(path: Path, ppo: dict[str, Any], deepspeed: dict[str, Any], eval_prompts: int | None = None) -> Path:
    config = {
        "run": {"name": "faults", "seed": 0},
        "deepspeed": deepspeed,
        "tracking": "none",
        "movie_reviews": {"eval_text_docs": 20, "sft_examples": 64, "sft_eval_examples": 16, "reward_pairs": 64,
                          "reward_eval_pairs": 16, "ppo_prompts": 64, "eval_prompts": 16},
        "pretrain": {"enabled": False}, "sft": {"enabled": False}, "reward": {"enabled": False},
        "ppo": {"max_new_tokens": MAX_NEW_TOKENS, "ppo_epochs": 1, "lr": 1.0e-3, "logging_steps": 1, **ppo},
        "eval": {"enabled": eval_prompts is not None, "num_prompts": eval_prompts or 1},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def rlhf(*args: Any, expect: int = 0, **env: str) -> str:
    code, out, _ = communicate(args, cli_env(**env), TIMEOUT_S, merge_output=True)
    assert code == expect, f"rlhf {' '.join(map(str, args))} exited {code}, not {expect}:\n{out[-6000:]}"
    return out


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "ppo" / "final" / "manifest.json").read_text())


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]


def launch_log(run_dir: Path) -> str:
    return (run_dir / "ppo" / "logs" / "launch.log").read_text()


def without_time(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


# ---------------------------------------------------------------------------------------------------------------
# 1-2. two ZeRO-3 ranks, one stopping at once and one running to the limit, then the evaluation


ROLLOUT, STEPS = 4, 2
FINISH_S = 70  # past DEEPSPEED_TIMEOUT=1 (minutes)
# TORCH_DISTRIBUTED_DEBUG=DETAIL logs each collective a rank enters (with TORCH_CPP_LOG_LEVEL=INFO), e.g.
# [rank1]:[I1129 ... ProcessGroupWrapper.cpp:710] [Rank 1] Running collective: CollectiveFingerPrint(SequenceNumber=1, ...
COLLECTIVE = re.compile(r"^\[rank(\d)\]:\S+ \S+ ProcessGroupWrapper\.cpp:\d+\] \[Rank \d\] Running collective: (.+)$",
                        re.MULTILINE)


@dataclass
class UnevenRun:
    run_dir: Path
    out: str
    prompts: dict[int, list[str]]  # rank -> the prompts it is dealt, over all steps


@pytest.fixture(scope="module")
def uneven_run(models, tmp_path_factory) -> UnevenRun:
    from stages.ppo.trainer import prompt_indices  # how the stage deals prompts to ranks

    root = tmp_path_factory.mktemp("uneven")
    n_prompts = ROLLOUT * STEPS  # one epoch: each prompt is dealt once
    rank_of = {i: rank for step in range(STEPS) for rank in (0, 1)
               for i in prompt_indices(step, n_prompts, ROLLOUT, rank, 2, seed=0)}
    texts = [f"{i} {STOP if rank_of[i] == 0 else GO}" for i in range(n_prompts)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    config = write_config(root / "uneven.yaml", {
        "input": str(models.uneven), "reward_model": str(models.reward),
        "data": {"train": str(prompts), "eval": str(prompts)},
        "rollout_batch_size": ROLLOUT, "minibatch_size": 2, "max_steps": STEPS, "save_steps": None,
    }, deepspeed={"config": "zero3", "num_gpus": 2}, eval_prompts=4)
    run_dir = root / "run"
    out = rlhf("run", config, "--run-dir", run_dir, TORCH_DISTRIBUTED_DEBUG="DETAIL", TORCH_CPP_LOG_LEVEL="INFO",
               DEEPSPEED_TIMEOUT="1", RLHF_TEST_FAULT=f"ppo:finish:{FINISH_S}")
    return UnevenRun(run_dir, out, {rank: [t for i, t in enumerate(texts) if rank_of[i] == rank] for rank in (0, 1)})


def test_the_uneven_policy_ends_rank_0s_prompts_at_once_and_runs_rank_1s_to_the_limit(models, uneven_run):
    """The premise of the next test, on the policy as saved and the prompts each rank is dealt."""
    import torch

    from pipeline.generation import encode_prompts, left_pad, sample
    from pipeline.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(models.uneven))
    policy = load_model(str(models.uneven)).eval()
    go = tokenizer(GO, add_special_tokens=False)["input_ids"][-1]
    for rank, dealt in uneven_run.prompts.items():
        assert len(dealt) == ROLLOUT // 2 * STEPS
        ids, mask = left_pad(encode_prompts(tokenizer, dealt, None), tokenizer.pad_token_id)
        responses = sample(policy, ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_id=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(rank))
        expected = [[tokenizer.eos_token_id]] if rank == 0 else [[go] * MAX_NEW_TOKENS]
        assert responses.tolist() == expected * len(dealt), (rank, responses)


def test_a_rank_that_stops_at_once_and_one_that_runs_to_the_limit_stay_in_step(uneven_run):
    run_dir = uneven_run.run_dir
    assert f"[ppo] step {STEPS}/{STEPS}" in uneven_run.out, uneven_run.out[-4000:]
    m = manifest(run_dir)
    assert m["world_size"] == 2 and m["placement"]["ranks_per_node"] == [2]
    rows = [row for row in metric_rows(run_dir) if "ppo/response_length" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:  # the mean over ranks of 1 token (all ended) and MAX_NEW_TOKENS (none ended)
        assert row["ppo/response_length"] == (1 + MAX_NEW_TOKENS) / 2, row
        assert row["ppo/eos_fraction"] == 0.5, row
    # every collective of the stage, as each rank called it (kind, shapes, dtypes), in order: the same on both
    calls: dict[int, list[str]] = {0: [], 1: []}
    for rank, call in COLLECTIVE.findall(launch_log(run_dir)):
        calls[int(rank)].append(call)
    assert calls[0] == calls[1]
    assert sum(f"OpType=ALLGATHER, TensorShape=[{ROLLOUT // 2}]," in call for call in calls[0]) == STEPS  # scores


def test_the_end_of_run_evaluation_on_two_ranks(models, uneven_run):
    """Rank 0 judges the policies (and finishes FINISH_S s late, past the process group's one-minute timeout)
    while rank 1 waits at the stage's last collective, then both publish."""
    run_dir = uneven_run.run_dir
    m = manifest(run_dir)
    evaluation = m["evaluation"]
    assert evaluation["settings"]["n_prompts"] == 4
    assert evaluation["paths"] == {"sft": str(models.uneven), "ppo": str(run_dir / "ppo" / "final")}
    assert set(evaluation["verdicts"]) == {"ppo"}
    for key in ("judge_win_rate", "judge_mean_sft", "judge_mean_ppo", "eval_verdict"):
        assert key in m["metrics"], sorted(m["metrics"])
    # judged once (by rank 0): one comparison line per temperature
    assert launch_log(run_dir).count("ppo vs sft: wins") == len(evaluation["temperatures"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# 3. rlhf resume --stage --from, the refusal after a config change, and --force


def test_resume_from_a_named_checkpoint_and_force_across_a_config_change(models, tmp_path):
    config = write_config(tmp_path / "ppo.yaml", {
        "input": str(models.policy), "reward_model": str(models.reward),
        "data": {"train": "movie-reviews:ppo_train", "eval": "movie-reviews:ppo_eval"},
        "rollout_batch_size": 4, "minibatch_size": 4, "max_steps": 3, "save_steps": 1, "keep_checkpoints": 2,
    }, deepspeed={"config": "zero0", "num_gpus": 1})
    run_dir = tmp_path / "run"
    first, second = run_dir / "ppo" / "checkpoint-1", run_dir / "ppo" / "checkpoint-2"
    kill_at_checkpoint([*RLHF, "run", str(config), "--run-dir", str(run_dir)], second, tmp_path / "killed.log",
                       cli_env(), TIMEOUT_S)
    killed = {row["step"]: without_time(row) for row in metric_rows(run_dir)}
    assert sorted(killed) == [1, 2] and not (run_dir / "ppo" / "final").exists()

    # --from an older checkpoint than the newest: it continues from step 1, and step 2 comes out as before
    out = rlhf("resume", run_dir, "--stage", "ppo", "--from", first)
    assert f"[ppo] resumed from {first} at step 1" in out, out[-4000:]
    assert manifest(run_dir)["metrics"]["steps"] == 3
    rows = (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3]  # one row per step across the resume
    resumed = {row["step"]: without_time(row) for row in metric_rows(run_dir)}
    assert resumed[2] == killed[2]

    # a changed stage config: the checkpoint is refused in one line, then taken with --force
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["ppo"]["clip_range"] = 0.3
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before, log = manifest(run_dir), run_dir / "ppo" / "logs" / "launch.log"
    log_size = log.stat().st_size
    out = rlhf("resume", run_dir, "--stage", "ppo", "--from", second, expect=2)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and (f"{second}: checkpoint was made with a different config (ppo.clip_range: 0.2 -> 0.3); "
                                 "restore those settings or start the stage over (`rlhf resume RUN_DIR --stage ppo "
                                 "--force` resumes anyway)") in errors[0], out[-4000:]
    assert manifest(run_dir) == before and log.stat().st_size == log_size  # refused before the launch
    out = rlhf("resume", run_dir, "--stage", "ppo", "--from", second, "--force")
    assert f"[ppo] resumed from {second} at step 2" in out, out[-4000:]
    after = manifest(run_dir)
    assert after["stage_config"]["clip_range"] == 0.3 and after["config_hash"] != before["config_hash"]
    assert max(row["step"] for row in metric_rows(run_dir)) == 3
