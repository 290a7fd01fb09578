"""Run the enabled stages of a pipeline in order, each as its own DeepSpeed launch.

A stage whose final manifest matches its current fingerprint is skipped; any other stage is
launched, and the next one reads its input from the manifest it published.

With `RLHF_NODE_RANK` set, the same command runs once per node (pipeline/launch.py): node 0 does all
of the above; every other node waits for node 0's `config.yaml`, then makes the same skip decisions
from the same manifests and starts only its own node's launcher for each stage that runs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from pipeline import movie_reviews
from pipeline.checkpoint import atomic_write_text, complete_checkpoints, read_json
from pipeline.config import STAGE_ORDER, PipelineConfig, config_to_yaml, load_config, read_yaml
from pipeline.errors import StageFailed, UserError
from pipeline.launch import check_per_node, launcher_command, launcher_env, node_rank, release_shm, run_launcher
from pipeline.rundir import (RunDir, RunLock, check_new_run_dir, completed_final, load_run_config, require_run_dir,
                             stage_fingerprint, stage_inputs)
from pipeline.sharding import describe as describe_sharding


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


def missing_local_data(source: str | None) -> bool:
    """A data source that names a local file or path (not the demo's splits, not a hub name) that is not there."""
    return bool(source) and not source.startswith(movie_reviews.PREFIX) and (
        Path(source).suffix in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/", "~"))
    ) and not Path(source).expanduser().exists()


def preflight(cfg: PipelineConfig, stage: str, run_dir: RunDir, inputs: dict[str, Any]) -> None:
    """Fail in a second, not after a launch: local data and model paths must exist."""
    section = cfg.stage(stage)
    for split in ("train", "eval"):
        source = getattr(section.data, split)
        if missing_local_data(source):
            raise UserError(f"{stage}.data.{split}: data file not found: {source}")
    for key, entry in inputs.items():
        path = entry and entry["path"]
        if path and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise UserError(f"{INPUT_KEYS[stage][key]}: path not found: {path}")
    if stage == "ppo" and cfg.eval.enabled:  # the stage ends by judging its policy
        from pipeline.evaluation.judges import check_judge

        if missing_local_data(cfg.eval.prompts):
            raise UserError(f"eval.prompts: data file not found: {cfg.eval.prompts}")
        check_judge(cfg.eval.judge, (inputs.get("reward_model") or {}).get("path"))


# The config key that names each input of a stage (the keys of rundir.stage_inputs).
INPUT_KEYS = {
    "pretrain": {"model": "pretrain.input", "tokenizer": "pretrain.tokenizer"},
    "sft": {"model": "sft.input"},
    "reward": {"model": "reward.input"},
    "ppo": {"actor": "ppo.input", "reward_model": "ppo.reward_model", "critic": "ppo.critic"},
}
PICKLED_WEIGHTS = ("pytorch_model*.bin", "adapter_model*.bin", "*.ckpt", "consolidated*.pth")


def check_model_dir(path: Path, key: str) -> None:
    """A local model input must be a checkpoint dir with safetensors weights (pickle weights are never loaded)."""
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a checkpoint directory")
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise UserError(f"{key}: {path} holds no config.json; not a Hugging Face checkpoint")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
        why = (f"only pickle weights ({', '.join(pickled)}), which are never loaded; convert them to safetensors"
               if pickled else "no *.safetensors weights")
        raise UserError(f"{key}: {path} holds {why}")


def check_reward_head(path: Path, key: str) -> None:
    """A reward model must score with exactly one output (a fresh head would score at random)."""
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        return  # adapters only: the stage checks the loaded model
    outputs = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if outputs != 1:
        raise UserError(f"{key}: {path} has {outputs} outputs (config.json); a reward model needs exactly one")


def preflight_launch(cfg: PipelineConfig, stage: str, inputs: dict[str, Any]) -> None:
    """Checks for a stage about to launch (not one being skipped): hub access, weights format, reward head."""
    from pipeline.data import hub_reachable, is_local_source

    remote: list[tuple[str, str]] = []  # (config key, hub id)
    for key, entry in inputs.items():
        path = entry and entry["path"]
        if not path:
            continue
        local = Path(path).expanduser()
        if not local.exists():
            remote.append((INPUT_KEYS[stage][key], path))
        elif key != "tokenizer":
            check_model_dir(local, INPUT_KEYS[stage][key])
            if key == "reward_model":
                check_reward_head(local, INPUT_KEYS[stage][key])
    for split in ("train", "eval"):
        source = getattr(cfg.stage(stage).data, split)
        if source and not source.startswith(movie_reviews.PREFIX) and not is_local_source(source):
            remote.append((f"{stage}.data.{split}", source))
    if remote and not hub_reachable():
        key, name = remote[0]
        raise UserError(f"{key}: '{name}' is not a local path and the Hugging Face hub is offline "
                        "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, or huggingface.co cannot be reached)")


def stage_error(log: Path, offset: int) -> str | None:
    """The one line that says why the stage failed, from what this launch added to its log: a rank's own
    `error: ...`, else the last line of a traceback, else the signal that killed a rank."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    text = text.replace("\r", "\n")
    # at the start of a line, or right after a progress bar the rank was drawing (`... 4/6 [00:01, 3.1it/s]`)
    errors = re.findall(r"(?:^|(?<=\]))error: (.+)", text, flags=re.MULTILINE)
    if errors:
        return errors[-1].strip()
    # a crash: the last line of the rank's traceback, `SomeError: what`
    raised = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)(?:: .+)?)$", text, flags=re.MULTILINE)
    if raised:
        return raised[-1].strip()
    killed = re.findall(r"exits with return code = -(\d+)", text)  # DeepSpeed's launcher on a signalled rank
    if killed:
        return f"a rank was killed by signal {killed[-1]}" + (" (out of memory?)" if killed[-1] == "9" else "")
    return None


def supersede_checkpoints(run_dir: RunDir, stage: str, old_hash: str) -> None:
    """A finished stage re-runs under a new config: keep its old periodic checkpoints, out of the way.

    They belong to the previous config, so the new run must not resume from them, and deleting
    them would lose good checkpoints; they move to `<stage>/superseded/<old hash>/`.
    """
    old = complete_checkpoints(run_dir.stage_dir(stage))
    if not old:
        return
    target = run_dir.stage_dir(stage) / "superseded" / old_hash
    target.mkdir(parents=True, exist_ok=True)
    for path in old:
        os.replace(path, target / path.name)
    print(f"[{stage}] config changed since the last finished run; its checkpoints moved to {target}", flush=True)


def fmt_metrics(metrics: dict[str, Any], limit: int = 8) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" for k, v in items[:limit])


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
        if manifest and stage not in resume_from and not follower:
            supersede_checkpoints(run_dir, stage, manifest["config_hash"])
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
        finally:
            release_shm(int(cmd[cmd.index("--master_port") + 1]))
        if code != 0:
            raise StageFailed(stage, code, f"; log: {log}", cause=stage_error(log, offset))
        done = completed_final(run_dir, stage)
        if done is None or done.get("config_hash") != fingerprint:  # exit 0 but nothing published
            raise StageFailed(stage, code, f"; log: {log}",
                              cause=f"the stage exited without publishing {run_dir.final_dir(stage)}")
        print(f"[{stage}] done in {time.time() - started:.0f}s: {fmt_metrics(done.get('metrics', {}))}", flush=True)


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


def check_before_writing(cfg: PipelineConfig, run_dir: RunDir, stages: list[str]) -> None:
    """Everything that can be checked without training, for every selected stage, before `rlhf run`
    writes config.yaml or launches: the run dir, data files and their first rows, model paths, the judge."""
    from pipeline.data import check_first_row

    check_new_run_dir(run_dir.root)
    for i, stage in enumerate(stages):
        preflight(cfg, stage, run_dir, stage_inputs(cfg, stage, run_dir, upcoming=stages[:i]))
        check_first_row(cfg.stage(stage).data, stage, stage)


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
        atomic_write_text(rd.config_path, config_to_yaml(cfg))
        run_stages(cfg, rd, selected, node=node)
        if cfg.eval.enabled and completed_final(rd, "sft"):
            from pipeline.evaluation.rundir import evaluate_after_pipeline  # imports torch only when evaluating

            evaluate_after_pipeline(rd, cfg)
    return rd


def resume_pipeline(run_dir: str, stage: str | None, from_path: str | None, force: bool) -> RunDir:
    """Continue a run with the config it was started with: finished stages are skipped."""
    rd = require_run_dir(Path(run_dir))
    cfg = load_run_config(rd)
    if from_path is not None and stage is None:
        raise UserError("--from needs --stage (which stage the checkpoint belongs to)")
    stages = select_stages(cfg, stage) if stage else cfg.enabled_stages()
    resume_from = {}
    if from_path is not None:
        path = Path(from_path)
        if not path.is_dir():
            raise UserError(f"--from: checkpoint dir not found: {path}")
        if not path.name.startswith("checkpoint-") or path.resolve().parent != rd.stage_dir(stages[0]).resolve():
            raise UserError(f"--from: {path} is not a checkpoint of stage '{stages[0]}' of this run "
                            f"(expected {rd.stage_dir(stages[0])}/checkpoint-N)")
        resume_from[stages[0]] = path.resolve()
    node = node_rank()
    if node:  # another node: it only launches; node 0 holds the run lock
        run_stages(cfg, rd, stages, resume_from, force_resume=force, node=node)
        return rd
    with RunLock(rd):
        run_stages(cfg, rd, stages, resume_from, force_resume=force, node=node)
    return rd


def describe_placement(placement: dict[str, Any]) -> str:
    """`2 node(s) x 1 rank(s)`, or the ranks of each node when they differ."""
    per_node = placement["ranks_per_node"]
    ranks = f"{per_node[0]} rank(s)" if len(set(per_node)) == 1 else f"{per_node} ranks"
    return f"{placement['nodes']} node(s) x {ranks}"


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
    run_dir = require_run_dir(run_dir.root)
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
            if manifest.get("placement"):
                lines.append(f"  placement: {describe_placement(manifest['placement'])}")
            if "sharding" in manifest.get("metrics", {}):
                lines.append(f"  sharding: {describe_sharding(manifest['metrics']['sharding'])}")
            lines.append(f"  finished: {manifest.get('finished_at')}  config hash: {manifest.get('config_hash')}")
        if info["checkpoints"]:
            lines.append(f"  periodic checkpoints: {', '.join(Path(p).name for p in info['checkpoints'])}")
            if not manifest:
                lines.append(f"  would resume from: {info['checkpoints'][-1]}")
    return lines


__all__ = ["run_pipeline", "run_stages", "status_lines", "load_run_config", "read_json"]
