"""Run the enabled stages of a pipeline in order, each as its own DeepSpeed launch.

A stage whose final manifest matches its current fingerprint is skipped; any other stage is
launched, and the next one reads its input from the manifest it published.

With `RLHF_NODE_RANK` set, the same command runs once per node (pipeline/launch.py): node 0 does all
of the above; every other node waits for node 0's `config.yaml`, then makes the same skip decisions
from the same manifests and starts only its own node's launcher for each stage that runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from pipeline import movie_reviews
from pipeline.checkpoint import (CHECKPOINT_MARKERS, atomic_write_text, check_resumable, complete_checkpoints,
                                 read_json, resume_point, write_json)
from pipeline.config import STAGE_ORDER, PipelineConfig, config_to_yaml, load_config
from pipeline.errors import StageFailed, UserError
from pipeline.launch import (check_per_node, launcher_command, launcher_env, node_rank, release_shm, run_launcher,
                             stage_error)
from pipeline.preflight import (check_before_writing, check_run_dir_owner, preflight, preflight_launch,
                                uses_movie_reviews)
from pipeline.rundir import (RunDir, RunLock, completed_final, load_run_config, require_run_dir,
                             semantic_stage_config, stage_fingerprint, stage_inputs)
from pipeline.status import fmt_metrics
from pipeline.tracking import RUN_ID_FILE


def default_run_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def select_stages(cfg: PipelineConfig, stages: str | None, option: str = "--stages") -> list[str]:
    """The stages `option` names, in pipeline order; every enabled stage when it is not given."""
    if stages is None:
        return cfg.enabled_stages()
    names = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGE_ORDER]
    if unknown or not names:
        what = f"unknown stage '{unknown[0]}'" if unknown else "names no stage"
        raise UserError(f"{option}: {what}; choices: {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in names]


def checkpoint_hash(path: Path) -> str | None:
    """The config hash in a periodic checkpoint's marker (None: no readable marker)."""
    marker = next((read_json(path / name) for name in CHECKPOINT_MARKERS if (path / name).exists()), None)
    return marker.get("config_hash") if isinstance(marker, dict) else None


def free_dir(parent: Path, name: str, entries: list[str]) -> Path:
    """`parent/name`, else `name.2`, `name.3`, ...: the first that holds none of `entries`, so a move never
    lands on a directory that is there already (an earlier supersede of the same config)."""
    target, n = parent / name, 1
    while any((target / entry).exists() for entry in entries):
        n += 1
        target = parent / f"{name}.{n}"
    return target


# Which config a stage's metrics.jsonl and W&B run id belong to ({"config_hash": ...}), written before each
# launch: when that config is superseded they move with its checkpoints, so the next config starts a W&B
# run of its own and the old run's history is kept.
ATTEMPT = "attempt.json"
TRACKER_FILES = ("metrics.jsonl", RUN_ID_FILE, ATTEMPT)


def tracker_owner(stage_dir: Path, finished_hash: str, fingerprint: str) -> str:
    """The config hash the stage's tracker files belong to: its attempt.json's; in a run dir from before
    that record, this config's if it saved checkpoints already (a killed rerun), else the finished run's."""
    recorded = read_json(stage_dir / ATTEMPT)
    if isinstance(recorded, dict) and recorded.get("config_hash"):
        return recorded["config_hash"]
    own = any(checkpoint_hash(p) == fingerprint for p in complete_checkpoints(stage_dir))
    return fingerprint if own else finished_hash


def supersede_checkpoints(run_dir: RunDir, stage: str, fingerprint: str, finished_hash: str) -> list[tuple[Path, Path]]:
    """A finished stage (config hash `finished_hash`) re-runs under a new config: keep what other configs
    left, out of the way.

    Their periodic checkpoints must not be resumed (nor saved over) by the new run, and deleting them would
    lose good checkpoints; each moves to `<stage>/superseded/<its config hash>/`, and so do the stage's
    metrics.jsonl, wandb_run_id and attempt.json when they belong to another config (the new config logs a
    W&B run of its own; the old history is kept). What belongs to the current config (`fingerprint`: a rerun
    of it was killed) stays, and the stage resumes from it. Returns (where each was, where it went), for
    `restore_superseded`.
    """
    stage_dir = run_dir.stage_dir(stage)
    owner = tracker_owner(stage_dir, finished_hash, fingerprint)
    by_hash: dict[str, list[Path]] = {}
    for path in complete_checkpoints(stage_dir):
        old_hash = checkpoint_hash(path) or "unknown"
        if old_hash != fingerprint:
            by_hash.setdefault(old_hash, []).append(path)
    tracker = [stage_dir / name for name in TRACKER_FILES if (stage_dir / name).exists()]
    if owner != fingerprint and tracker:
        by_hash.setdefault(owner, []).extend(tracker)
    moved = []
    for old_hash, paths in by_hash.items():
        target = free_dir(stage_dir / "superseded", old_hash, [p.name for p in paths])
        target.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.replace(path, target / path.name)
            moved.append((path, target / path.name))
        checkpoints = any(p.name.startswith("checkpoint-") for p in paths)
        metrics = ", ".join(p.name for p in paths if p in tracker)  # metrics.jsonl, wandb_run_id, attempt.json
        what = f"its checkpoints moved to {target}" + (f" (and {metrics})" if metrics else "") if checkpoints \
            else f"{metrics} moved to {target}"
        print(f"[{stage}] config changed since the last finished run; {what}", flush=True)
    return moved


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def restore_superseded(run_dir: RunDir, stage: str, moved: list[tuple[Path, Path]]) -> None:
    """The new run failed before saving a checkpoint of its own: put back what `supersede_checkpoints` moved
    (checkpoints, metrics.jsonl, W&B run id), so a failed run leaves the stage as it found it. (Once it has
    saved one, they stay under superseded/.)

    A checkpoint-N the failed run left half-written (no marker) where an old one goes back is removed first,
    and so are the tracker files of the failed attempt. Called while the run's failure propagates: it never
    raises, so that failure is the one shown."""
    stage_dir = run_dir.stage_dir(stage)
    try:
        if not moved or complete_checkpoints(stage_dir):
            return
        if any(original.name in TRACKER_FILES for original, _ in moved):
            for name in TRACKER_FILES:  # the failed attempt's: the old run's go back, or none was there
                (stage_dir / name).unlink(missing_ok=True)
        for original, path in moved:
            if original.exists():
                remove(original)
            os.replace(path, original)
            with contextlib.suppress(OSError):  # superseded/<hash>/, once empty
                path.parent.rmdir()
                path.parent.parent.rmdir()
        print(f"[{stage}] failed before saving a checkpoint; the earlier run's checkpoints are back in {stage_dir}",
              flush=True)
    except Exception as err:
        print(f"[{stage}] warning: could not put the earlier run's checkpoints back from {stage_dir / 'superseded'} "
              f"({err}); they are still there", flush=True)


def check_resume_before_writing(cfg: PipelineConfig, run_dir: RunDir, stages: list[str]) -> None:
    """`rlhf run`, before config.yaml is written: the first selected stage that will run must not be about
    to resume from a checkpoint of another config, so a command refused for that changes nothing (not even
    the config `rlhf resume` reads). The same check `run_stages` makes before each launch; stages after the
    first one that runs are checked there (their inputs are not made yet)."""
    for stage in stages:
        inputs = stage_inputs(cfg, stage, run_dir)  # every earlier selected stage is up to date: its manifest exists
        fingerprint = stage_fingerprint(cfg, stage, inputs)
        manifest = completed_final(run_dir, stage)
        if manifest and manifest.get("config_hash") == fingerprint:
            continue  # skipped
        newest = None if manifest else resume_point(None, run_dir.stage_dir(stage))  # else: superseded ones move
        if newest is not None:
            check_resumable(newest, stage, fingerprint, semantic_stage_config(cfg, stage),
                            cfg.stage_deepspeed(stage).world_size, force=False)
        return


def run_stages(cfg: PipelineConfig, run_dir: RunDir, stages: list[str], resume_from: dict[str, Path] | None = None,
               force_resume: bool = False, node: int | None = None) -> None:
    """Launch each stage unless its final checkpoint is already up to date. Needs the run lock held.

    A stage named in `resume_from` always runs, continuing from that checkpoint. With `node` (from
    RLHF_NODE_RANK) only that node's launcher starts; a node other than 0 holds no lock and writes
    nothing but its own launcher log (`<stage>/logs/launch-node<N>.log`).
    """
    resume_from = resume_from or {}
    follower = bool(node)  # node 1, 2, ...: node 0 prepares data and moves checkpoints
    release_shm()  # buffers left by earlier launches that were killed
    if uses_movie_reviews(cfg, stages) and not follower:
        movie_reviews.prepare(cfg.movie_reviews, run_dir.data_dir / "movie-reviews")
    for stage in stages:
        inputs = stage_inputs(cfg, stage, run_dir)
        fingerprint = stage_fingerprint(cfg, stage, inputs)
        manifest = completed_final(run_dir, stage)
        preflight(cfg, stage, run_dir, inputs)
        if manifest and manifest.get("config_hash") == fingerprint and stage not in resume_from:
            print(f"[{stage}] skipped: {run_dir.final_dir(stage)} is up to date (config hash {fingerprint})")
            continue
        ds = cfg.stage_deepspeed(stage)
        check_per_node(ds, node, f"{stage}.deepspeed")
        preflight_launch(cfg, stage, inputs)
        moved = []
        if manifest and stage not in resume_from and not follower:
            moved = supersede_checkpoints(run_dir, stage, fingerprint, manifest["config_hash"])
        resume_from_here = resume_point(resume_from.get(stage), run_dir.stage_dir(stage))
        if resume_from_here is not None:  # the stage will resume from it: refuse a wrong one before the launch
            check_resumable(resume_from_here, stage, fingerprint, semantic_stage_config(cfg, stage), ds.world_size,
                            force_resume)
        if not follower:  # what the tracker files logged from here on belong to
            write_json(run_dir.stage_dir(stage) / ATTEMPT, {"config_hash": fingerprint})
        extra = ["--resume-from", str(resume_from[stage])] if stage in resume_from else []
        extra += ["--force-resume"] if force_resume else []
        cmd = launcher_command(ds, run_dir.root, stage, extra, node)
        log = run_dir.log_dir(stage) / (f"launch-node{node}.log" if follower else "launch.log")
        where = f"node {node}'s launcher: {ds.num_gpus} of " if node is not None else "on "
        print(f"[{stage}] starting {where}{ds.world_size} rank(s); log: {log}", flush=True)
        started = time.time()
        offset = log.stat().st_size if log.exists() else 0
        try:
            code = run_launcher(cmd, launcher_env(ds), log)
            if code != 0:
                raise StageFailed(stage, code, f"; log: {log}", cause=stage_error(log, offset))
            done = completed_final(run_dir, stage)
            if done is None or done.get("config_hash") != fingerprint:  # exit 0 but nothing published
                raise StageFailed(stage, code, f"; log: {log}",
                                  cause=f"the stage exited without publishing {run_dir.final_dir(stage)}")
        except BaseException:  # a failed launch, or Ctrl-C while it ran
            restore_superseded(run_dir, stage, moved)
            raise
        finally:
            release_shm(int(cmd[cmd.index("--master_port") + 1]))
        print(f"[{stage}] done in {time.time() - started:.0f}s: {fmt_metrics(done.get('metrics', {}))}", flush=True)


# The stages the last `rlhf run` selected (its --stages), so `rlhf resume` continues those and no others.
SELECTED_STAGES = "stages.json"


def recorded_stages(rd: RunDir, cfg: PipelineConfig) -> list[str]:
    """The stages the last `rlhf run` in `rd` selected; every enabled stage in a run dir that has no record."""
    recorded = read_json(rd.root / SELECTED_STAGES)
    if isinstance(recorded, dict) and isinstance(recorded.get("stages"), list):
        return [s for s in STAGE_ORDER if s in recorded["stages"]]
    return cfg.enabled_stages()


FOLLOW_TIMEOUT_S = 600.0


def wait_for_config(run_dir: RunDir, cfg: PipelineConfig, node: int, timeout_s: float = FOLLOW_TIMEOUT_S) -> None:
    """Node N > 0: wait until node 0 has written this same config, so every rank trains what node 0 records."""
    expected, deadline, said = config_to_yaml(cfg), time.monotonic() + timeout_s, False
    while not (run_dir.config_path.exists() and run_dir.config_path.read_text() == expected):
        if time.monotonic() > deadline:
            raise UserError(f"{run_dir.config_path}: node 0 has not written this command's config in {timeout_s:.0f}s; "
                            "start the same `rlhf run` command (config, overrides, --stages, --run-dir) "
                            "with RLHF_NODE_RANK=0 on the first node")
        if not said:
            print(f"[node {node}] waiting for node 0 to write {run_dir.config_path}", flush=True)
            said = True
        time.sleep(1.0)


def run_pipeline(config_path: str, overrides: list[str], stages: str | None, run_dir: str | None) -> RunDir:
    cfg = load_config(config_path, overrides)
    rd = RunDir(Path(run_dir) if run_dir else default_run_dir(cfg))
    selected = select_stages(cfg, stages)
    check_before_writing(cfg, rd, selected)
    node = node_rank()
    if node:  # another node: node 0 holds the run lock, writes the run dir and evaluates
        wait_for_config(rd, cfg, node)
        run_stages(cfg, rd, selected, node=node)
        return rd
    with RunLock(rd):
        check_run_dir_owner(rd, cfg)
        check_resume_before_writing(cfg, rd, selected)
        atomic_write_text(rd.config_path, config_to_yaml(cfg))
        write_json(rd.root / SELECTED_STAGES, {"stages": selected})
        run_stages(cfg, rd, selected, node=node)
        if cfg.eval.enabled and completed_final(rd, "sft"):
            from pipeline.evaluation.rundir import evaluate_after_pipeline  # imports torch only when evaluating

            evaluate_after_pipeline(rd, cfg)
    return rd


def resume_pipeline(run_dir: str, stage: str | None, from_path: str | None, force: bool) -> RunDir:
    """Continue a run with the config it was started with, and (without `stage`) the stages its last
    `rlhf run` selected: finished stages are skipped."""
    rd = require_run_dir(Path(run_dir))
    cfg = load_run_config(rd)
    if from_path is not None and stage is None:
        raise UserError("--from needs --stage (which stage the checkpoint belongs to)")
    stages = select_stages(cfg, stage, "--stage") if stage is not None else recorded_stages(rd, cfg)
    resume_from = {}
    if from_path is not None:
        path = Path(from_path)
        if not path.is_dir():
            raise UserError(f"--from: checkpoint dir not found: {path}")
        if not path.name.startswith("checkpoint-") or path.resolve().parent != rd.stage_dir(stages[0]).resolve():
            raise UserError(f"--from: {path} is not a checkpoint of stage '{stages[0]}' of this run "
                            f"(expected {rd.stage_dir(stages[0])}/checkpoint-N)")
        resume_from[stages[0]] = path.resolve()
        inputs = stage_inputs(cfg, stages[0], rd)  # before anything is written: the same check the launch makes
        check_resumable(path, stages[0], stage_fingerprint(cfg, stages[0], inputs),
                        semantic_stage_config(cfg, stages[0]), cfg.stage_deepspeed(stages[0]).world_size, force)
    node = node_rank()
    if node:  # another node: it only launches; node 0 holds the run lock
        run_stages(cfg, rd, stages, resume_from, force_resume=force, node=node)
        return rd
    with RunLock(rd):
        run_stages(cfg, rd, stages, resume_from, force_resume=force, node=node)
    return rd
