"""Run the enabled stages of a pipeline in order, each as its own DeepSpeed launch.

A stage whose final manifest matches its current fingerprint is skipped; any other stage is
launched, and the next one reads its input from the manifest it published.

With `RLHF_NODE_RANK` set, the same command runs once per node (pipeline/launch.py): node 0 does all
of the above; every other node waits for node 0's `config.yaml`, then makes the same skip decisions
from the same manifests and starts only its own node's launcher for each stage that runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import movie_reviews
from pipeline.checkpoint import atomic_write_text, check_resumable, read_json, resume_point, write_json
from pipeline.config import STAGE_ORDER, PipelineConfig, config_to_yaml, load_config
from pipeline.errors import StageFailed, UserError
from pipeline.launch import (check_per_node, launcher_command, launcher_env, node_rank, release_shm, run_launcher,
                             stage_error)
from pipeline.preflight import (check_before_writing, check_run_dir_owner, preflight, preflight_launch,
                                uses_movie_reviews)
from pipeline.rundir import (RunDir, RunLock, completed_final, load_run_config, require_run_dir,
                             semantic_stage_config, stage_fingerprint, stage_inputs)
from pipeline.status import fmt_metrics
from pipeline.supersede import ATTEMPT, restore_superseded, supersede_checkpoints


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
