"""Resume every stage after a crash at any moment, to exactly the uninterrupted run's weights and losses.

For each stage a reference run goes through uninterrupted; a second run dir gets:

1. a SIGKILL of the whole `rlhf` process group right after checkpoint-K is complete,
2. a rerun that resumes from K and dies half-way through writing checkpoint-M: that checkpoint must
   never count (its partial dir is left but not listed, `rlhf status` still names K),
3. a last rerun, which must say it resumed from K and end with the reference's final weights (bit for bit)
   and the same logged values at every step.

    stage            ranks, ZeRO   kill after   dies writing             resumes from
    pretrain         1, ZeRO-0     ckpt-3       ckpt-6 (all but marker)  ckpt-3
    sft              1, ZeRO-0     ckpt-1       ckpt-3 (all but marker)  ckpt-2
    reward           1, ZeRO-0     ckpt-2       ckpt-4 (all but marker)  ckpt-2
    ppo              1, ZeRO-0     ckpt-1       ckpt-3 (actor only)      ckpt-2   (test_resume_ppo.py)
    ppo              2, ZeRO-3     ckpt-1       ckpt-2 (actor only)      ckpt-1   (test_resume_ppo.py)

The kill points are exact, not races against a poll: `RLHF_TEST_FAULT` (pipeline/checkpoint.py) makes
the ranks stop right after checkpoint-K is complete (the test then SIGKILLs the process group), or
SIGKILL themselves mid-write (on two ranks: both, once each wrote its actor shard). Everything runs on
CPU, where every run with the same seed computes the same floats, so all comparisons are exact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.checkpoint import FAULT_ENV, complete_checkpoints
from tests.conftest import RLHF, ROOT, TINY, stopped_ranks

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


TIMEOUT_S = 900  # generous: a loaded 2-core machine runs a stage several times slower than an idle one
ZERO3_TWO_RANKS = ("deepspeed.num_gpus=2", "deepspeed.config=zero3")
# Wall-clock figures, and the Trainer's summary of one train() call (after a resume: of the resumed part only).
NOT_COMPARED = ("_runtime", "_per_second", "train_loss", "time/")


def env(fault: str | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    return {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **({FAULT_ENV: fault} if fault else {})}


def start(config: Path, run_dir: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    # Output to a file (no pipe to fill); its own process group, so one killpg ends the CLI, launcher and ranks.
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([*RLHF, "run", str(config), "--run-dir", str(run_dir), *args], cwd=ROOT,
                            env=env(fault), stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.output = out  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.output.seek(0)  # type: ignore[attr-defined]
    return proc.output.read()[-6000:]  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"rlhf ran over {TIMEOUT_S}s:\n{output(proc)}")
    return proc.returncode, output(proc)


def run_ok(config: Path, run_dir: Path, *args: str) -> str:
    code, out = finish(start(config, run_dir, *args))
    assert code == 0, f"rlhf run exited {code}:\n{out}"
    return out


def kill_after_checkpoint(config: Path, run_dir: Path, stage: str, step: int, ranks: int, *args: str) -> None:
    """Run until every rank has finished checkpoint-`step` and stopped, then SIGKILL the whole process group."""
    proc = start(config, run_dir, *args, fault=f"{stage}:{step}:saved")
    deadline = time.monotonic() + TIMEOUT_S
    while stopped_ranks(proc.pid) < ranks and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    held = stopped_ranks(proc.pid) == ranks
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert held, f"the ranks never stopped after checkpoint-{step}:\n{output(proc)}"
    assert newest_complete(run_dir, stage) == step


def crash_while_writing(config: Path, run_dir: Path, stage: str, step: int, resumes_from: int, *args: str) -> Path:
    """Rerun, resuming from checkpoint-`resumes_from`, with every rank SIGKILLed while writing checkpoint-`step`.

    Returns the partial checkpoint dir it left behind."""
    code, out = finish(start(config, run_dir, *args, fault=f"{stage}:{step}:writing"))
    assert code != 0, f"the run was meant to die writing checkpoint-{step}:\n{out}"
    stage_dir = run_dir / stage
    half = stage_dir / f"checkpoint-{step}"
    assert half.exists() and any(half.rglob("*")), f"nothing of checkpoint-{step} was written:\n{out}"
    assert not (stage_dir / "final").exists()
    # The half-written checkpoint never counts: the previous one is still the newest complete one.
    assert half not in complete_checkpoints(stage_dir)
    assert newest_complete(run_dir, stage) == resumes_from
    status = subprocess.run([*RLHF, "status", str(run_dir)], env=env(), capture_output=True, text=True, check=True)
    assert f"would resume from: {stage_dir / f'checkpoint-{resumes_from}'}" in status.stdout, status.stdout
    return half


def newest_complete(run_dir: Path, stage: str) -> int:
    found = complete_checkpoints(run_dir / stage)
    assert found, f"no complete checkpoint in {run_dir / stage}"
    return int(found[-1].name.split("-")[1])


def logged(run_dir: Path, stage: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl merged by step: a resumed run appends the steps it redoes, so a later row wins."""
    rows: dict[int, dict[str, Any]] = {}
    for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update(
            {k: v for k, v in row.items() if not any(part in k for part in NOT_COMPARED)})
    return rows


def assert_same_result(reference: Path, resumed: Path, stage: str, steps: int) -> None:
    from safetensors.torch import load_file

    a = load_file(reference / stage / "final" / "model.safetensors")
    b = load_file(resumed / stage / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "final weights differ from the uninterrupted run"
    rows_a, rows_b = logged(reference, stage), logged(resumed, stage)
    assert max(rows_a) == steps and sorted(rows_a) == sorted(rows_b)
    loss = "ppo/policy_loss" if stage == "ppo" else "train/loss"
    assert sum(loss in row for row in rows_a.values()) >= 2, rows_a  # the comparison covers logged losses
    for step in sorted(rows_a):
        assert rows_b[step] == rows_a[step], f"{stage} step {step}"


# ---------------------------------------------------------------------------------------------------------------
# pretrain, SFT, reward: the Hugging Face Trainer stages on tests/configs/tiny.yaml


SFT = ("--stages", "sft", "sft.save_steps=1")


def reward_args(pretrained: Path) -> tuple[str, ...]:
    return ("--stages", "reward", "reward.save_steps=2", f"reward.input={pretrained / 'pretrain' / 'final'}")


def with_pretrain(pretrained: Path, run_dir: Path) -> Path:
    """A run dir holding a copy of the reference pretraining result, so SFT finds its input by manifest."""
    shutil.copytree(pretrained / "pretrain" / "final", run_dir / "pretrain" / "final")
    return run_dir


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The uninterrupted pretraining run (checkpoints at steps 3 and 6 of 6); also the later stages' input."""
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    run_ok(TINY, run_dir, "--stages", "pretrain")
    return run_dir


def test_pretrain_resumes_after_a_kill_and_a_crash_mid_checkpoint(pretrained, tmp_path):
    run_dir, args = tmp_path / "run", ("--stages", "pretrain")
    kill_after_checkpoint(TINY, run_dir, "pretrain", 3, 1, *args)
    crash_while_writing(TINY, run_dir, "pretrain", 6, 3, *args)  # the Trainer's files written, our marker not
    out = run_ok(TINY, run_dir, *args)
    assert f"[pretrain] resuming from {run_dir / 'pretrain' / 'checkpoint-3'}" in out, out
    assert_same_result(pretrained, run_dir, "pretrain", steps=6)


def test_a_rerun_that_fails_before_its_first_checkpoint_leaves_the_old_checkpoints_in_place(pretrained, tmp_path):
    """A new config moves a finished stage's checkpoints out of the way (superseded/); when the new run then
    fails before saving one of its own (here: its second data row is empty), they come back."""
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained, run_dir)
    before = [p.name for p in complete_checkpoints(run_dir / "pretrain")]
    manifest = (run_dir / "pretrain" / "final" / "manifest.json").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a perfectly good first review of a film"}) + "\n" + json.dumps({"text": ""}) + "\n")
    code, out = finish(start(TINY, run_dir, "--stages", "pretrain", f"pretrain.data.train={bad}"))
    assert code == 2 and f"{bad}: row 2: field 'text' is an empty string" in out, out
    assert "its checkpoints moved to" in out and "checkpoints are back in" in out, out
    assert [p.name for p in complete_checkpoints(run_dir / "pretrain")] == before == ["checkpoint-3", "checkpoint-6"]
    assert (run_dir / "pretrain" / "final" / "manifest.json").read_text() == manifest
    assert "skipped" in run_ok(TINY, run_dir, "--stages", "pretrain")  # the original config: still up to date


def test_sft_resumes_after_a_kill_and_a_crash_mid_checkpoint(pretrained, tmp_path):
    reference = with_pretrain(pretrained, tmp_path / "reference")
    run_ok(TINY, reference, *SFT)
    run_dir = with_pretrain(pretrained, tmp_path / "run")
    kill_after_checkpoint(TINY, run_dir, "sft", 1, 1, *SFT)
    crash_while_writing(TINY, run_dir, "sft", 3, 2, *SFT)
    out = run_ok(TINY, run_dir, *SFT)
    assert f"[sft] resuming from {run_dir / 'sft' / 'checkpoint-2'}" in out, out
    assert_same_result(reference, run_dir, "sft", steps=4)


@pytest.fixture(scope="module")
def rewarded(pretrained, tmp_path_factory) -> Path:
    """The uninterrupted reward-model run (checkpoints at steps 2 and 4 of 4); also PPO's reward model."""
    run_dir = tmp_path_factory.mktemp("rewarded") / "run"
    run_ok(TINY, run_dir, *reward_args(pretrained))
    return run_dir


def test_reward_resumes_after_a_kill_and_a_crash_mid_checkpoint(pretrained, rewarded, tmp_path):
    run_dir = tmp_path / "run"
    kill_after_checkpoint(TINY, run_dir, "reward", 2, 1, *reward_args(pretrained))
    crash_while_writing(TINY, run_dir, "reward", 4, 2, *reward_args(pretrained))  # the Trainer's files, no marker
    out = run_ok(TINY, run_dir, *reward_args(pretrained))
    assert f"[reward] resuming from {run_dir / 'reward' / 'checkpoint-2'}" in out, out
    assert_same_result(rewarded, run_dir, "reward", steps=4)
