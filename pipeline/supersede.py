"""What a stage's dir holds from another config, moved out of the way when a finished stage re-runs under a new
one (`<stage>/superseded/<config hash>/`), and put back when that re-run fails before saving anything.

Periodic checkpoints carry their config hash in their marker; the tracker files (metrics.jsonl, the W&B run id)
say theirs in `attempt.json`, which the orchestrator writes before each launch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from pipeline.checkpoint import CHECKPOINT_MARKERS, complete_checkpoints, read_json
from pipeline.rundir import RunDir
from pipeline.tracking import RUN_ID_FILE


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
        print(f"[{stage}] config or data changed since the last finished run; {what}", flush=True)
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
