"""Checkpoint directories and their manifests, written so a crash never leaves a half one.

A stage's hand-off is `RUN_DIR/<stage>/final/`: a Hugging Face checkpoint plus `manifest.json`.
Everything is written into a temporary sibling first, flushed, then renamed into place, and
the manifest (the commit point) is the last file written.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
COMPLETE = "complete"
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "deepspeed", "wandb", "rlhf-pipeline")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move a fully written `tmp` dir to `final`, keeping the old `final` until the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    _fsync_tree(tmp)
    previous = final.with_name(f"{final.name}.previous")
    if previous.exists():
        shutil.rmtree(previous)
    if final.exists():
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if previous.exists():
        shutil.rmtree(previous)
    return final


def recover_dir(final: str | Path) -> None:
    """Undo a publish cut off between its two renames: bring `final.previous` back."""
    final = Path(final)
    previous = final.with_name(f"{final.name}.previous")
    if not final.exists() and previous.exists():
        os.replace(previous, final)


# One protocol for every stage's periodic checkpoints (the Trainer stages' and PPO's): before any rank
# writes checkpoint-N in place, `open_checkpoint` withdraws a marker an earlier run left there; once every
# rank has written its files, `seal_checkpoint` has rank 0 write the marker (atomically: the commit point)
# and only then rotate old ones away. A checkpoint without the marker never counts, so a crash at any
# moment leaves the previous complete one as the newest.
CHECKPOINT_MARKER = "rlhf_complete.json"
# PPO checkpoints written before that protocol (renamed into place, ppo_state.json last) still count.
CHECKPOINT_MARKERS = (CHECKPOINT_MARKER, "ppo_state.json")


def open_checkpoint(path: Path, is_main: bool, barrier) -> None:
    """Before the ranks write `path` in place: a rerun that resumed from an older step rewrites a newer
    one, and its old marker must not vouch for half-new files."""
    if is_main:
        for name in CHECKPOINT_MARKERS:
            (path / name).unlink(missing_ok=True)
    barrier()


def seal_checkpoint(path: Path, marker: dict[str, Any], is_main: bool, barrier, keep: int) -> None:
    """After every rank wrote its part of `path`: rank 0 writes the marker, then drops all but the newest
    `keep` complete checkpoints. `marker` holds at least step, world_size, config_hash and stage_config
    (what `check_resumable` reads); a stage may add its loop state."""
    barrier()
    if is_main:
        _fsync_tree(path)
        write_json(path / CHECKPOINT_MARKER, marker)
        for old in complete_checkpoints(path.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def resume_point(given: str | Path | None, stage_dir: str | Path) -> Path | None:
    """The checkpoint a stage resumes from: `--from` if given, else its newest complete one, else None.
    One answer for the orchestrator's check before the launch and the stage's own load."""
    if given is not None:
        return Path(given)
    newest = complete_checkpoints(stage_dir)[-1:]
    return newest[0] if newest else None


def check_resumable(path: Path, stage: str, config_hash: str, stage_config: dict[str, Any], world_size: int,
                    force: bool) -> dict[str, Any]:
    """Refuse a checkpoint that was not saved complete, or by another rank count, or (unless `force`) by
    another config, naming what differs; returns its marker. Every stage's one check, made by the
    orchestrator before the launch and by the stage before it loads."""
    from pipeline.config import describe_changes
    from pipeline.errors import UserError

    marker = next((read_json(path / name) for name in CHECKPOINT_MARKERS if (path / name).exists()), None)
    if not isinstance(marker, dict):
        raise UserError(f"{path}: not a complete checkpoint (no {' or '.join(CHECKPOINT_MARKERS)}); pick another")
    if marker["world_size"] != world_size:
        raise UserError(f"{path}: saved with {marker['world_size']} ranks, now {world_size}; resume with the same "
                        f"{stage}.deepspeed num_gpus x num_nodes (ZeRO shards are per rank)")
    if marker["config_hash"] != config_hash and not force:
        raise UserError(f"{path}: checkpoint was made with a different config ("
                        f"{describe_changes(marker.get('stage_config', {}), stage_config, stage)}); restore those "
                        f"settings or start the stage over (`rlhf resume RUN_DIR --stage {stage} --force` resumes "
                        "anyway)")
    return marker


# Fault injection for the resume tests (tests/test_resume.py), off unless the variable is set:
# RLHF_TEST_FAULT=<stage>:<step>:writing  SIGKILLs each rank half-way through writing checkpoint-<step>;
# RLHF_TEST_FAULT=<stage>:<step>:saved    SIGSTOPs each rank once checkpoint-<step> is complete, so the
#                                         test can SIGKILL the whole run at exactly that point.
# RLHF_TEST_FAULT=<stage>:finish:<seconds>  makes rank 0 take that much longer to finish the stage (as a
#                                         long evaluation would) while the other ranks wait for it.
FAULT_ENV = "RLHF_TEST_FAULT"


def fault_point(stage: str, step: int, where: str) -> None:
    if os.environ.get(FAULT_ENV) == f"{stage}:{step}:{where}":
        os.kill(os.getpid(), signal.SIGKILL if where == "writing" else signal.SIGSTOP)


def slow_finish(stage: str) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith(f"{stage}:finish:"):
        time.sleep(float(fault.rsplit(":", 1)[1]))


def complete_checkpoints(stage_dir: str | Path) -> list[Path]:
    """The stage's complete `checkpoint-N` dirs, oldest first."""
    found = [p for p in Path(stage_dir).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and any((p / m).exists() for m in CHECKPOINT_MARKERS)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_finite(stage: str, values: dict[str, Any], step: int, stage_dir: Path) -> None:
    """Stop on the first NaN/inf among `values` (None: not measured), naming the step and the last good
    checkpoint (kept as is). Every stage's guard, the PPO loop's too (here, not beside the Trainer callbacks:
    the PPO ranks and their value process need not import the Trainer, and peft with it, 3-4 s each)."""
    from pipeline.errors import UserError

    for key, value in values.items():
        if value is not None and not math.isfinite(value):
            good = complete_checkpoints(stage_dir)
            raise UserError(f"{stage}: {key} is not finite at step {step} ({value}); last good checkpoint: "
                            f"{good[-1] if good else 'none (nothing saved yet)'}")


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any] | None:
    recover_dir(ckpt_dir)
    data = read_json(Path(ckpt_dir) / MANIFEST)
    return data if isinstance(data, dict) else None


def make_manifest(
    *,
    stage: str,
    config_hash: str,
    stage_config: dict[str, Any],
    inputs: dict[str, Any],
    metrics: dict[str, Any],
    started_at: str,
    world_size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "stage": stage,
        "status": COMPLETE,
        "config_hash": config_hash,
        "inputs": inputs,
        "metrics": metrics,
        "world_size": world_size,
        "started_at": started_at,
        "finished_at": now(),
        "libraries": library_versions(),
        "stage_config": stage_config,
        **(extra or {}),
    }
