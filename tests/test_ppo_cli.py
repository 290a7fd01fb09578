"""The PPO stage on a tiny Llama through the real CLI: on one rank (trains, saves, evaluates; prompts cut to
max_prompt_length are counted), on two ZeRO-3 ranks (bit-for-bit reproducible), with a LoRA actor merged into
a full model, and resumed after a SIGKILL to exactly the uninterrupted run's weights and metrics. The setup
(fixture `tiny`, `write_config`, the `rlhf run` helpers) is tests/test_ppo_stage.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import kill_at_checkpoint
from tests.test_ppo_stage import (LORA, RUN_TIMEOUT_S, assert_same_weights, cli_env, final_weights, metric_rows,
                                  rlhf_command, rlhf_run, tiny, without_time, write_config)  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier

EXPECTED_METRICS = ("reward_mean", "kl_to_ref", "policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy",
                    "response_length", "eos_fraction")
EXPECTED_EVAL = ("judge_mean_sft", "judge_mean_ppo", "judge_win_rate", "real_word_share_sft", "real_word_share_ppo",
                 "rep_2_ppo", "top_bigram_share_ppo", "judge_win_rate_t1", "eval_win", "reward_hacking_suspected",
                 "eval_verdict")
PROMPT_CUT = 40  # ppo.max_prompt_length of the 1-rank run: cuts some of its prompts, not all


@pytest.fixture(scope="module")
def one_rank_run(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted 1-rank run: (config, run dir). Shared by the CLI test and the resume test."""
    root = tmp_path_factory.mktemp("one_rank")
    config = write_config(root / "ppo.yaml", tiny, max_prompt_length=PROMPT_CUT)
    run_dir = root / "run_a"
    rlhf_run(config, run_dir)
    return config, run_dir


# 1. one rank


def test_one_rank_trains_saves_and_evaluates(tiny, one_rank_run):
    from transformers import AutoModelForCausalLM

    _, run_dir = one_rank_run
    final = run_dir / "ppo" / "final"
    trained = AutoModelForCausalLM.from_pretrained(final)
    before = tiny.policy.state_dict()
    after = trained.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in before), "the actor did not change"

    manifest = json.loads((final / "manifest.json").read_text())
    metrics = manifest["metrics"]
    for key in (*EXPECTED_METRICS, *EXPECTED_EVAL):
        assert key in metrics, f"manifest metrics lack {key}: {sorted(metrics)}"
    assert metrics["steps"] == 4
    assert list(manifest["evaluation"]["temperatures"]) == ["0.7", "1"]
    assert all(set(b["policies"]) == {"sft", "ppo"} for b in manifest["evaluation"]["temperatures"].values())

    lines = (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"time/rollout_s", "time/score_s", "time/advantages_s", "time/update_s", "time/step_s"} <= row.keys()
        for phase in ("rollout", "score", "update"):  # response tokens over the phase's time
            tokens = row["ppo/response_length"] * 8  # rollout_batch_size responses on the one rank
            assert row[f"time/{phase}_tokens_per_s"] == pytest.approx(tokens / row[f"time/{phase}_s"], rel=1e-6)
        assert {f"ppo/{k}" for k in EXPECTED_METRICS} <= row.keys()
    assert rows[0]["ppo/kl_to_ref"] == 0.0  # the actor starts as the reference
    assert rows[-1]["ppo/reward_mean"] == pytest.approx(metrics["reward_mean"])


def test_prompts_cut_to_max_prompt_length_are_counted_in_a_warning(tiny, one_rank_run):
    from pipeline.generation import encode_prompts

    _, run_dir = one_rank_run
    prompts = [json.loads(line)["prompt"] for line in
               (run_dir / "data" / "movie-reviews" / "ppo_train.jsonl").read_text().splitlines()]
    longer = sum(len(ids) > PROMPT_CUT for ids in encode_prompts(tiny.tokenizer, prompts, None))
    assert 0 < longer < len(prompts)
    log = (run_dir / "ppo" / "logs" / "launch.log").read_text()
    assert (f"[ppo] warning: {longer} of {len(prompts)} prompts are longer than ppo.max_prompt_length "
            f"({PROMPT_CUT} tokens") in log


# 2. two ranks under ZeRO-3: bit-for-bit reproducible


def test_two_ranks_zero3_is_deterministic(tiny, tmp_path):
    config = write_config(tmp_path / "ppo.yaml", tiny, deepspeed={"config": "zero3", "num_gpus": 2},
                          eval_enabled=False, max_steps=2, save_steps=None)
    first, second = tmp_path / "first", tmp_path / "second"
    rlhf_run(config, first)
    rlhf_run(config, second)
    assert json.loads((first / "ppo" / "final" / "manifest.json").read_text())["world_size"] == 2
    weights = final_weights(first)
    shapes = {k: v.shape for k, v in tiny.policy.state_dict().items()}
    assert {k: v.shape for k, v in weights.items()} == {k: shapes[k] for k in weights}  # gathered, not shards
    assert_same_weights(weights, final_weights(second))
    rows_first, rows_second = metric_rows(first), metric_rows(second)
    assert sorted(rows_first) == [1, 2]
    assert [without_time(rows_first[s]) for s in (1, 2)] == [without_time(rows_second[s]) for s in (1, 2)]


# 3. a LoRA actor


def test_lora_actor_merges_into_a_full_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path / "ppo.yaml", tiny, eval_enabled=False, max_steps=2, save_steps=None, lora=LORA)
    run_dir = tmp_path / "run"
    rlhf_run(config, run_dir)
    final = run_dir / "ppo" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["lora"] == {"merged": True}
    merged = AutoModelForCausalLM.from_pretrained(final).state_dict()
    base = tiny.policy.state_dict()
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed


# 4. resumed after SIGKILL


def test_resume_after_kill_matches_the_uninterrupted_run(one_rank_run, tmp_path):
    config, run_a = one_rank_run
    run_b = tmp_path / "run_b"
    no_eval = "eval.enabled=false"  # the judge runs after the actor is saved: it cannot change what is compared
    kill_at_checkpoint(rlhf_command(config, run_b, no_eval), run_b / "ppo" / "checkpoint-2", tmp_path / "killed.log",
                       cli_env(), RUN_TIMEOUT_S)

    out = rlhf_run(config, run_b, no_eval)
    assert f"resumed from {run_b / 'ppo' / 'checkpoint-2'} at step 2" in out, out[-4000:]
    assert_same_weights(final_weights(run_a), final_weights(run_b))
    rows_a, rows_b = metric_rows(run_a), metric_rows(run_b)
    assert sorted(rows_b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # 1-2 from the killed run, 3-4 from the resumed one
        assert without_time(rows_b[step]) == without_time(rows_a[step]), f"step {step}"
