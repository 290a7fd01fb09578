"""Run the enabled stages of a pipeline in order, each as its own DeepSpeed launch.

A stage whose final manifest matches its current fingerprint is skipped; any other stage is
launched, and the next one reads its input from the manifest it published.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline import movie_reviews
from pipeline.checkpoint import atomic_write_text, complete_checkpoints, read_json
from pipeline.config import STAGE_ORDER, PipelineConfig, config_to_yaml, load_config, read_yaml
from pipeline.errors import StageFailed, UserError
from pipeline.launch import launcher_command, launcher_env, run_launcher
from pipeline.rundir import RunDir, RunLock, completed_final, stage_fingerprint, stage_inputs


def default_run_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def select_stages(cfg: PipelineConfig, stages: str | None) -> list[str]:
    if not stages:
        return cfg.enabled_stages()
    names = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGE_ORDER]
    if unknown:
        raise UserError(f"--stages: unknown stage '{unknown[0]}'; choices: {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in names]


def check_run_dir_owner(run_dir: RunDir, cfg: PipelineConfig) -> None:
    """Refuse a run dir that holds another pipeline's run."""
    if not run_dir.config_path.exists():
        return
    previous = read_yaml(run_dir.config_path)
    name = (previous.get("run") or {}).get("name")
    if name is not None and name != cfg.run.name:
        raise UserError(
            f"{run_dir.root}: run dir holds pipeline run '{name}', not '{cfg.run.name}'; use another --run-dir"
        )


def uses_movie_reviews(cfg: PipelineConfig, stages: list[str]) -> bool:
    sources = [cfg.eval.prompts]
    for stage in stages:
        data = cfg.stage(stage).data
        sources += [data.train, data.eval]
    return any(s and s.startswith(movie_reviews.PREFIX) for s in sources)


def fmt_metrics(metrics: dict[str, Any], limit: int = 8) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" for k, v in items[:limit])


def run_stages(cfg: PipelineConfig, run_dir: RunDir, stages: list[str], resume_from: dict[str, Path] | None = None) -> None:
    """Launch each stage unless its final checkpoint is already up to date. Needs the run lock held."""
    if uses_movie_reviews(cfg, stages):
        movie_reviews.prepare(cfg.movie_reviews, run_dir.data_dir / "movie-reviews")
    for stage in stages:
        inputs = stage_inputs(cfg, stage, run_dir)
        fingerprint = stage_fingerprint(cfg, stage, inputs)
        manifest = completed_final(run_dir, stage)
        if manifest and manifest.get("config_hash") == fingerprint:
            print(f"[{stage}] skipped: {run_dir.final_dir(stage)} is up to date (config hash {fingerprint})")
            continue
        ds = cfg.stage_deepspeed(stage)
        extra = ["--resume-from", str(resume_from[stage])] if resume_from and stage in resume_from else []
        cmd = launcher_command(ds, run_dir.root, stage, extra)
        log = run_dir.log_dir(stage) / "launch.log"
        print(f"[{stage}] starting on {ds.world_size} rank(s); log: {log}", flush=True)
        started = time.time()
        code = run_launcher(cmd, launcher_env(ds), log)
        if code != 0:
            raise StageFailed(stage, code, f"; log: {log}")
        done = completed_final(run_dir, stage) or {}
        print(f"[{stage}] done in {time.time() - started:.0f}s: {fmt_metrics(done.get('metrics', {}))}", flush=True)


def run_pipeline(config_path: str, overrides: list[str], stages: str | None, run_dir: str | None) -> RunDir:
    cfg = load_config(config_path, overrides)
    rd = RunDir(Path(run_dir) if run_dir else default_run_dir(cfg))
    selected = select_stages(cfg, stages)
    with RunLock(rd):
        check_run_dir_owner(rd, cfg)
        atomic_write_text(rd.config_path, config_to_yaml(cfg))
        run_stages(cfg, rd, selected)
    return rd


def stage_state(run_dir: RunDir, stage: str) -> dict[str, Any]:
    final = completed_final(run_dir, stage)
    checkpoints = complete_checkpoints(run_dir.stage_dir(stage))
    if final:
        state = "complete"
    elif checkpoints:
        state = "interrupted"
    elif run_dir.stage_dir(stage).exists():
        state = "started"
    else:
        state = "not started"
    return {"state": state, "manifest": final, "checkpoints": [str(p) for p in checkpoints]}


def status_lines(run_dir: RunDir) -> list[str]:
    if not run_dir.root.exists():
        raise UserError(f"{run_dir.root}: run dir not found")
    lines = [f"run dir: {run_dir.root}"]
    for stage in STAGE_ORDER:
        info = stage_state(run_dir, stage)
        lines.append(f"{stage:9s} {info['state']}")
        manifest = info["manifest"]
        if manifest:
            for key, value in manifest.get("inputs", {}).items():
                if value:
                    lines.append(f"  input {key}: {value['path']}")
            lines.append(f"  checkpoint: {run_dir.final_dir(stage)}")
            lines.append(f"  metrics: {fmt_metrics(manifest.get('metrics', {}), limit=20)}")
            lines.append(f"  finished: {manifest.get('finished_at')}  config hash: {manifest.get('config_hash')}")
        if info["checkpoints"]:
            lines.append(f"  periodic checkpoints: {', '.join(Path(p).name for p in info['checkpoints'])}")
            if not manifest:
                lines.append(f"  would resume from: {info['checkpoints'][-1]}")
    return lines


def load_run_config(run_dir: RunDir) -> PipelineConfig:
    if not run_dir.config_path.exists():
        raise UserError(f"{run_dir.root}: no config.yaml; is this a run dir?")
    return load_config(run_dir.config_path)


__all__ = ["run_pipeline", "run_stages", "status_lines", "load_run_config", "read_json"]
