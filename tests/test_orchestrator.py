"""What `rlhf run` and `rlhf resume` decide and move in the run dir, around a stand-in launcher.

The launcher is replaced by `Launcher`, which does in a few milliseconds what a stage does to the run dir:
seal periodic checkpoints (the marker names the config hash), publish final/, log metrics.jsonl and keep a
W&B run id, and stop where a test says (a kill after a checkpoint, a failure while writing one). The real
stages under real kills are in tests/test_resume.py; this file checks the orchestrator's side, on one core.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import orchestrator
from pipeline.checkpoint import CHECKPOINT_MARKER, complete_checkpoints, make_manifest, now, write_json
from pipeline.errors import StageFailed, UserError
from pipeline.rundir import RunDir, load_run_config, semantic_stage_config, stage_fingerprint, stage_inputs
from pipeline.tracking import MetricsFile, stage_run_id
from tests.conftest import TINY


class Killed(BaseException):
    """The whole `rlhf` process group SIGKILLed (the stand-in raises it; nothing after the launch counts)."""


class Launcher:
    """Stand-in for `run_launcher`: each launch pops one plan.

    plan: ("finish", steps)   seal checkpoint-N for each N in steps, then publish final/ and exit 0;
          ("kill", steps)     seal them, then the process group is killed;
          ("half", steps, n)  seal them, then die half-way through writing checkpoint-n (no marker; exit 1).
    """

    def __init__(self, mp: pytest.MonkeyPatch, *plans: tuple):
        self.plans = list(plans)
        self.launched: list[tuple[str, list[str]]] = []
        mp.setattr(orchestrator, "run_launcher", self)
        mp.setattr(orchestrator.movie_reviews, "prepare", lambda *a, **k: None)  # no stage reads the data here

    def __call__(self, cmd: list[str], env: dict[str, str], log_path: Path, show_all: bool = False) -> int:
        arg = dict(zip(cmd, cmd[1:]))
        rd, stage = RunDir(Path(arg["--run-dir"])), arg["--stage"]
        self.launched.append((stage, cmd[cmd.index("--stage"):]))
        cfg = load_run_config(rd)
        inputs = stage_inputs(cfg, stage, rd)
        fingerprint = stage_fingerprint(cfg, stage, inputs)
        stage_dir = rd.stage_dir(stage)
        stage_run_id(stage_dir)  # the tracker starts: a W&B run id, new or the one this stage continues
        plan = self.plans.pop(0)
        metrics = MetricsFile(stage_dir / "metrics.jsonl")
        for step in plan[1]:
            metrics.write({"train/loss": 1.0 / step, "lr": cfg.stage(stage).lr}, step)
            path = stage_dir / f"checkpoint-{step}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "weights").write_text(fingerprint)
            write_json(path / CHECKPOINT_MARKER, {"step": step, "world_size": 1, "config_hash": fingerprint,
                                                  "stage_config": semantic_stage_config(cfg, stage)})
        if plan[0] == "kill":
            raise Killed()
        if plan[0] == "half":
            half = stage_dir / f"checkpoint-{plan[2]}"
            half.mkdir(parents=True, exist_ok=True)
            (half / "weights").write_text("half")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("RuntimeError: the real failure\n")
            return 1
        final = rd.final_dir(stage)
        final.mkdir(parents=True, exist_ok=True)
        (final / "weights").write_text(fingerprint)
        write_json(final / "manifest.json", make_manifest(
            stage=stage, config_hash=fingerprint, stage_config=semantic_stage_config(cfg, stage), inputs=inputs,
            metrics={}, started_at=now(), world_size=1))
        return 0


def run(run_dir: Path, *overrides: str, stages: str | None = "pretrain") -> RunDir:
    return orchestrator.run_pipeline(str(TINY), list(overrides), stages, str(run_dir))


def marker_hash(path: Path) -> str:
    return json.loads((path / CHECKPOINT_MARKER).read_text())["config_hash"]


def test_a_refused_run_leaves_config_yaml_so_resume_still_works(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        Launcher(mp, ("kill", [3]))
        with pytest.raises(Killed):
            run(run_dir)
        config = (run_dir / "config.yaml").read_text()
        with pytest.raises(UserError, match=r"pretrain.lr: 0.001 -> 0.002"):
            run(run_dir, "pretrain.lr=2e-3")
        assert (run_dir / "config.yaml").read_text() == config
        launcher = Launcher(mp, ("finish", [6]))
        orchestrator.resume_pipeline(str(run_dir), "pretrain", None, False)  # the original config resumes
    assert [stage for stage, _ in launcher.launched] == ["pretrain"]
    assert marker_hash(run_dir / "pretrain" / "checkpoint-6") == marker_hash(run_dir / "pretrain" / "checkpoint-3")


def checkpoints(stage_dir: Path) -> dict[str, str]:
    return {p.name: marker_hash(p) for p in complete_checkpoints(stage_dir)}


@pytest.mark.parametrize("steps", [[3], [2, 4]])
def test_a_killed_rerun_under_a_new_config_resumes_from_its_own_checkpoints(tmp_path, steps):
    """A finished stage re-runs under a new config, is killed after `steps`, and the same command runs again:
    it resumes from its own checkpoints (none moved, nothing landing on superseded/<old hash>/checkpoint-3)."""
    run_dir, new = tmp_path / "run", ["pretrain.lr=2e-3", f"pretrain.save_steps={steps[0]}"]
    stage_dir = run_dir / "pretrain"
    with pytest.MonkeyPatch.context() as mp:
        Launcher(mp, ("finish", [3, 6]), ("kill", steps), ("finish", [6]))
        run(run_dir)
        old = checkpoints(stage_dir)
        old_hash = old["checkpoint-3"]
        with pytest.raises(Killed):
            run(run_dir, *new)
        own = checkpoints(stage_dir)
        assert own and old_hash not in own.values()
        seen = []
        mp.setattr(orchestrator, "check_resumable", lambda path, *a, **k: seen.append(path.name))
        run(run_dir, *new)
    assert seen == [f"checkpoint-{steps[-1]}"]  # the launch resumed from the new config's newest checkpoint
    assert checkpoints(stage_dir / "superseded" / old_hash) == old  # the finished run's, each under its own hash
    final = json.loads((stage_dir / "final" / "manifest.json").read_text())
    assert final["config_hash"] == own[f"checkpoint-{steps[0]}"]


def test_configs_that_alternate_keep_every_superseded_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "pretrain"
    with pytest.MonkeyPatch.context() as mp:
        Launcher(mp, *[("finish", [3, 6])] * 4)
        for lr in ("1e-3", "2e-3", "1e-3", "2e-3"):
            run(run_dir, f"pretrain.lr={lr}")
    superseded = sorted(p.relative_to(stage_dir / "superseded").parent.as_posix()
                        for p in (stage_dir / "superseded").glob("*/checkpoint-*"))
    assert len(superseded) == 6 and len(set(superseded)) == 3  # <hash a>, <hash b>, <hash a>.2; two each
    assert any(name.endswith(".2") for name in superseded)


def test_a_rerun_that_dies_writing_its_first_checkpoint_shows_its_error_and_puts_the_old_ones_back(tmp_path):
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "pretrain"
    with pytest.MonkeyPatch.context() as mp:
        Launcher(mp, ("finish", [3, 6]), ("half", [], 3))
        run(run_dir)
        old = checkpoints(stage_dir)
        with pytest.raises(StageFailed, match="the real failure"):
            run(run_dir, "pretrain.lr=2e-3")
    assert checkpoints(stage_dir) == old  # back in place; the half-written checkpoint-3 is gone
    assert (stage_dir / "checkpoint-3" / "weights").read_text() == old["checkpoint-3"]
    assert not (stage_dir / "superseded").exists()


def test_resume_runs_only_the_stages_the_interrupted_command_selected(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        Launcher(mp, ("kill", [3]))
        with pytest.raises(Killed):
            run(run_dir, stages="pretrain")
        launcher = Launcher(mp, ("finish", [6]))
        orchestrator.resume_pipeline(str(run_dir), None, None, False)
    assert [stage for stage, _ in launcher.launched] == ["pretrain"]  # not sft and reward after it


def tracker_files(stage_dir: Path) -> tuple[str, str]:
    return (stage_dir / "wandb_run_id").read_text(), (stage_dir / "metrics.jsonl").read_text()


def test_a_new_config_starts_its_own_wandb_run_and_keeps_the_old_runs_history(tmp_path):
    run_dir, new = tmp_path / "run", "pretrain.lr=2e-3"
    stage_dir = run_dir / "pretrain"
    with pytest.MonkeyPatch.context() as mp:
        Launcher(mp, ("finish", [3, 6]), ("kill", [3]), ("finish", [6]))
        run(run_dir)
        old_hash, finished = checkpoints(stage_dir)["checkpoint-3"], tracker_files(stage_dir)
        with pytest.raises(Killed):
            run(run_dir, new)
        attempt = tracker_files(stage_dir)
        assert attempt[0] != finished[0]  # a W&B run of its own
        assert tracker_files(stage_dir / "superseded" / old_hash) == finished  # the finished run's history, kept
        run(run_dir, new)  # the killed rerun resumes: it continues its own W&B run
    assert tracker_files(stage_dir)[0] == attempt[0]
    assert tracker_files(stage_dir / "superseded" / old_hash) == finished


def test_a_failed_rerun_puts_back_the_old_wandb_run_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "pretrain"
    with pytest.MonkeyPatch.context() as mp:
        Launcher(mp, ("finish", [3, 6]), ("half", [], 3), ("finish", [6]))
        run(run_dir)
        finished = tracker_files(stage_dir)
        with pytest.raises(StageFailed):
            run(run_dir, "pretrain.lr=2e-3")
        assert tracker_files(stage_dir) == finished
        run(run_dir, "pretrain.lr=3e-3")  # another config: the finished run's files move again, with their hash
    assert tracker_files(stage_dir)[0] != finished[0]
