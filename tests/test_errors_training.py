"""Failures during training: a NaN reward or loss, a full disk. Each stops with one line naming the step or the
culprit and the last good checkpoint, exit code 2, and every checkpoint before it byte for byte as it was.
Last, no file or output of these runs holds the secrets in their environment.

The NaN reward runs the PPO stage in this process (its reward scorer patched); the NaN loss and the full
disk run the real CLI and launcher (subprocesses), the fault injected into the stage process by a
`sitecustomize.py` on PYTHONPATH. All start from the shared tiny pretraining run (tests/errors_shared.py).
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import complete_checkpoints
from tests.errors_shared import (SECRETS, SHARED, Result, assert_untouched, checkpoint_files, copy_run, final_of,
                                 finish, refused, run_args, start)

pytest_plugins = ["tests.errors_shared"]  # fixtures pretrained, run_dir, rlhf_here
pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


def test_nan_reward_stops_ppo_naming_the_step_and_last_good_checkpoint(run_dir, rlhf_here, pretrained, tmp_path,
                                                                       monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from stages.ppo import experience, trainer

    reward_dir = tmp_path / "reward_model"
    AutoModelForSequenceClassification.from_pretrained(final_of(pretrained), num_labels=1).save_pretrained(reward_dir)
    real, calls = experience.last_token_scores, []

    def scores_turning_nan(model, rollout):  # finite at step 1, NaN from step 2 on
        calls.append(1)
        scores = real(model, rollout)
        return scores if len(calls) == 1 else torch.full_like(scores, float("nan"))

    monkeypatch.setattr(experience, "last_token_scores", scores_turning_nan)
    # The patch lives in this process: keep the reward model here too, not in the value process
    # (spawned, so unpatched) that one CPU rank would otherwise start. The NaN check is the loop's.
    monkeypatch.setattr(trainer, "wants_value_process", lambda ctx, zero_stages: False)
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, "ppo", "ppo.enabled=true", f"ppo.input={final_of(pretrained)}",
                                 f"ppo.reward_model={reward_dir}", "ppo.data.train=movie-reviews:ppo_train",
                                 "ppo.rollout_batch_size=2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                                 "ppo.max_new_tokens=4", "ppo.max_steps=3", "ppo.save_steps=1"))
    good = run_dir / "ppo" / "checkpoint-1"
    refused(result, "ppo/reward_mean is not finite at step 2", f"last good checkpoint: {good}")
    assert complete_checkpoints(run_dir / "ppo") == [good]
    assert not (run_dir / "ppo" / "final").exists()
    assert_untouched(run_dir, before)


INJECT = '''\
"""Fault injection for tests/test_errors_training.py, in stage workers only (the launcher gives them --local_rank=N)."""
import sys

if any(arg.startswith("--local_rank=") for arg in sys.argv):
{body}'''

DIVERGE_BEFORE_STEP_6 = '''\
    import torch
    from transformers import TrainerCallback

    from pipeline import hf_training

    class Diverge(TrainerCallback):  # every weight NaN before step 6, as after an exploding update
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

    _callbacks = hf_training.checkpoint_callbacks
    hf_training.checkpoint_callbacks = lambda ctx: [*_callbacks(ctx), Diverge()]
'''

DISK_FULL = '''\
    import errno
    import os

    from transformers import modeling_utils

    def save_file(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    modeling_utils.safe_save_file = save_file
'''


@dataclass
class FailedRun:
    run_dir: Path
    before: dict[str, str]
    result: Result


@pytest.fixture(scope="module")
def failed_runs(pretrained, tmp_path_factory) -> dict[str, FailedRun]:
    """The shared pretraining, interrupted after checkpoint-5, resumed, and then
    `nan`: the model diverges before step 6, the last (a save step, not a logging one; one checkpoint kept);
    `disk_full`: no space left when checkpoint-6 is written. Both run at once, through the real launcher."""
    root = tmp_path_factory.mktemp("failed_runs")
    faults = {"nan": (DIVERGE_BEFORE_STEP_6, ["pretrain.keep_checkpoints=1"]), "disk_full": (DISK_FULL, [])}
    runs, procs = {}, {}
    for name, (body, overrides) in faults.items():
        run_dir = copy_run(pretrained, root / name / "run", interrupted=True)
        inject = root / name / "inject"
        inject.mkdir()
        (inject / "sitecustomize.py").write_text(INJECT.format(body=body))
        runs[name] = FailedRun(run_dir, checkpoint_files(run_dir), None)  # type: ignore[arg-type]
        procs[name] = start(*run_args(run_dir, "pretrain", *SHARED, *overrides), inject_dir=inject)
    for name, proc in procs.items():
        runs[name].result = finish(proc)
    return runs


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(failed_runs):
    run = failed_runs["nan"]
    good = run.run_dir / "pretrain" / "checkpoint-5"
    assert f"resuming from {good}" in run.result.stdout
    # Step 6 saves but does not log: the loss is still checked before the save, so the NaN model is never
    # written, checkpoint-5 is not rotated away (keep_checkpoints=1), and no NaN final/ is published.
    refused(run.result, "stage 'pretrain' failed", "at step 6", f"last good checkpoint: {good}")
    assert re.search(r"pretrain: (loss|grad_norm) is not finite at step \d+ \((nan|inf)\)", run.result.stderr)
    assert complete_checkpoints(run.run_dir / "pretrain") == [good]
    assert not (run.run_dir / "pretrain" / "final").exists()
    assert checkpoint_files(run.run_dir) == run.before


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_says_how_much(failed_runs):
    run = failed_runs["disk_full"]
    good = run.run_dir / "pretrain" / "checkpoint-5"
    line = refused(run.result, "stage 'pretrain' failed", "No space left on device",
                   str(run.run_dir / "pretrain" / "checkpoint-6" / "model.safetensors"),
                   f"last good checkpoint kept: {good}")
    needed = float(line.split("a checkpoint needs about ")[1].split(" MiB")[0])
    size = sum(f.stat().st_size for f in good.rglob("*") if f.is_file()) / 2**20
    assert needed == pytest.approx(size, abs=0.05) and needed > 0
    assert " MiB free" in line
    assert complete_checkpoints(run.run_dir / "pretrain") == [good]
    assert_untouched(run.run_dir, run.before)


def test_secrets_reach_no_file_or_output(pretrained, failed_runs):
    """The W&B key and hub token are in every process's environment; no file or output may hold them."""
    run_dir, result = pretrained
    outputs = [result, *(run.result for run in failed_runs.values())]
    dirs = [run_dir, *(run.run_dir for run in failed_runs.values())]
    for secret in SECRETS.values():
        assert not [p for d in dirs for p in d.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not [r for r in outputs if secret in r.output]
