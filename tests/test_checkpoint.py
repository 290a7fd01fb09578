"""The one protocol for periodic checkpoints (pipeline/checkpoint.py), which the Trainer stages and PPO
both use: open (withdraw an old marker), every rank writes in place, seal (marker last, then rotate).
The stages under a real kill are in tests/test_resume.py and tests/test_resume_ppo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.checkpoint import (CHECKPOINT_MARKER, check_resumable, complete_checkpoints, open_checkpoint,
                                 resume_point, seal_checkpoint)
from pipeline.errors import UserError


def marker(step: int, world_size: int = 1) -> dict:
    return {"step": step, "world_size": world_size, "config_hash": "abc", "stage_config": {"lr": 0.1}}


def write(stage_dir: Path, step: int, keep: int = 10, seal: bool = True) -> Path:
    """A checkpoint-`step` as a stage writes it: open, one file per 'rank', seal."""
    calls = []
    path = stage_dir / f"checkpoint-{step}"
    open_checkpoint(path, True, lambda: calls.append("barrier"))
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights.bin").write_text(f"step {step}")
    if seal:
        seal_checkpoint(path, marker(step), True, lambda: calls.append("barrier"), keep)
    # every rank passes a barrier before the write and on each side of the marker
    assert calls == ["barrier"] * (3 if seal else 1)
    return path


def steps(stage_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in complete_checkpoints(stage_dir)]


def test_a_checkpoint_counts_only_once_sealed_and_the_oldest_rotate_away(tmp_path):
    write(tmp_path, 2)
    write(tmp_path, 4)
    write(tmp_path, 6, seal=False)  # a crash after the files, before the marker
    assert steps(tmp_path) == [2, 4] and resume_point(None, tmp_path) == tmp_path / "checkpoint-4"
    assert json.loads((tmp_path / "checkpoint-4" / CHECKPOINT_MARKER).read_text()) == marker(4)
    write(tmp_path, 8, keep=2)
    assert steps(tmp_path) == [4, 8]  # rotation counts complete ones only: 2 went, the unsealed 6 stays unused
    assert not (tmp_path / "checkpoint-2").exists()


def test_rewriting_a_newer_step_withdraws_its_marker_first(tmp_path):
    """Resumed from checkpoint-2 while a complete checkpoint-4 exists: rewriting 4 in place must not leave
    the old marker vouching for half-new files if the rewrite is cut off."""
    write(tmp_path, 2)
    write(tmp_path, 4)
    write(tmp_path, 4, seal=False)  # opened and partly rewritten, then killed
    assert steps(tmp_path) == [2]
    write(tmp_path, 4)
    assert steps(tmp_path) == [2, 4]


def test_resume_check_reads_the_marker_and_refuses_what_it_cannot_resume(tmp_path):
    path = write(tmp_path, 2)
    assert check_resumable(path, "sft", "abc", {"lr": 0.1}, 1, force=False) == marker(2)
    with pytest.raises(UserError, match="saved with 1 ranks, now 2"):
        check_resumable(path, "sft", "abc", {"lr": 0.1}, 2, force=False)
    with pytest.raises(UserError, match=r"different config \(sft.lr: 0.1 -> 0.2\)"):
        check_resumable(path, "sft", "xyz", {"lr": 0.2}, 1, force=False)
    assert check_resumable(path, "sft", "xyz", {"lr": 0.2}, 1, force=True)["step"] == 2
    unsealed = write(tmp_path, 3, seal=False)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        check_resumable(unsealed, "sft", "abc", {"lr": 0.1}, 1, force=False)


def test_a_ppo_checkpoint_from_before_the_one_protocol_still_resumes(tmp_path):
    """Those were renamed into place whole, their ppo_state.json (the same state) written last."""
    old = tmp_path / "checkpoint-5"
    old.mkdir()
    (old / "ppo_state.json").write_text(json.dumps(marker(5)))
    assert steps(tmp_path) == [5]
    assert check_resumable(old, "ppo", "abc", {"lr": 0.1}, 1, force=False)["step"] == 5
    write(tmp_path, 5, seal=False)  # rewriting it withdraws the old-style marker too
    assert steps(tmp_path) == []
