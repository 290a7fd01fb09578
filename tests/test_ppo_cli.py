"""The PPO stage on a tiny Llama through the real CLI: on one rank (trains, saves, evaluates; prompts cut to
max_prompt_length are counted) and with a LoRA actor merged into a full model. The setup (fixture `tiny`,
`write_config`, the `rlhf run` helpers) is tests/test_ppo_stage.py's. Resuming after a SIGKILL to exactly the
uninterrupted run's weights and metrics, on one rank and on two ZeRO-3 ranks (so two ZeRO-3 ranks are
bit-for-bit reproducible, and save whole weights), is tests/test_resume_ppo.py's; continuing the same W&B run
after one is tests/test_tracking.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_ppo_stage import LORA, rlhf_run, tiny, write_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier

EXPECTED_METRICS = ("reward_mean", "kl_to_ref", "policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy",
                    "response_length", "eos_fraction")
EXPECTED_EVAL = ("judge_mean_sft", "judge_mean_ppo", "judge_win_rate", "real_word_share_sft", "real_word_share_ppo",
                 "rep_2_ppo", "top_bigram_share_ppo", "judge_win_rate_t1", "eval_win", "reward_hacking_suspected",
                 "eval_verdict")
PROMPT_CUT = 40  # ppo.max_prompt_length of the 1-rank run: cuts some of its prompts, not all


@pytest.fixture(scope="module")
def one_rank_run(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """The 1-rank run: (config, run dir), read by the two tests below."""
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


# 2. a LoRA actor


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
