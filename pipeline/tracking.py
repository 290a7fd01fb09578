"""Experiment tracking: one W&B run per stage, logged from rank 0 only.

Other ranks (and `tracking: none`) get a NullTracker with the same methods, so stage code
never branches on rank to log. The run id lives in the stage dir, so a resumed stage continues
the same W&B run. A tracker failure is reported once and never stops training.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from pipeline.config import TrackingSection

SECRET_MARKERS = ("key", "token", "secret", "password", "passwd", "credentials")


def looks_secret(key: Any) -> bool:
    """`api_key`, `HF_TOKEN`, `apiKey`, `db-password`: a marker as a word, or ending the last word.
    Not `tokenizer` or `max_new_tokens`, which merely contain one."""
    words = re.split(r"[^a-z]+", str(key).lower())
    return any(w in SECRET_MARKERS for w in words) or words[-1].endswith(SECRET_MARKERS)


def scrub(obj: Any) -> Any:
    """Drop string values whose key looks like a credential, at any depth."""
    if isinstance(obj, dict):
        return {k: "<redacted>" if looks_secret(k) and isinstance(v, str) else scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def wandb_mode(cfg: TrackingSection) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    if not has_key and netrc.exists():
        has_key = "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if has_key else "offline"


def wandb_reachable(timeout_s: float = 3.0) -> str | None:
    """None when the W&B server (`WANDB_BASE_URL`, default api.wandb.ai) accepts a connection within
    `timeout_s`; else why not. Without it, wandb.init waits about 90 s before giving up offline."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{url.hostname}:{port} unreachable: {err.strerror or err}"
    return None


class MetricsFile:
    """Every logged step as one JSON line in `<stage>/metrics.jsonl`, so reports need no tracker.

    One row per step across a resume: the first step this process logs drops the rows an earlier,
    killed attempt logged from that step on (it resumed from an earlier checkpoint and logs them again).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.first = True

    def write(self, metrics: dict[str, Any], step: int | None) -> None:
        if self.path is None:
            return
        if self.first and step is not None:
            self.keep_until(step - 1)
            self.first = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop the rows after `step` and any line torn by a kill; written aside and renamed, so a crash
        keeps the old file."""
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (row := _row(line)) is not None and (row.get("step") or 0) <= step]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def _row(line: str) -> dict[str, Any] | None:
    """One row of metrics.jsonl; None for a line torn by a kill (the next row would be appended to it)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and line.endswith("\n") else None


RUN_ID_FILE = "wandb_run_id"


def stage_run_id(stage_dir: Path) -> str:
    """The stage's W&B run id: the one in `<stage>/wandb_run_id` (a resumed stage continues its run), else a
    new one, written there. A stage re-run under a new config finds none: the orchestrator moved it to
    `<stage>/superseded/<old hash>/` with the old run's checkpoints and metrics.jsonl."""
    id_file = stage_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    stage_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


class NullTracker:
    run_id: str | None = None

    def __init__(self, metrics_file: Path | None = None):
        self.file = MetricsFile(metrics_file)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.file.write(metrics, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None: ...
    def summary(self, metrics: dict[str, Any]) -> None: ...
    def log_checkpoint(self, path: Path, metadata: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


class WandbTracker:
    """A W&B run for one stage of one pipeline run."""

    def __init__(self, cfg: TrackingSection, *, run_name: str, stage: str, stage_dir: Path, config: dict[str, Any]):
        import wandb

        self._wandb = wandb
        self._warned = False
        self.stage = stage  # our lines start with `[stage]`: the terminal shows them (pipeline.launch)
        self.run_name = run_name
        self.log_artifacts = cfg.log_checkpoint_artifact
        self.file = MetricsFile(stage_dir / "metrics.jsonl")
        self.mode = wandb_mode(cfg)
        run_id = stage_run_id(stage_dir)
        self.run_id = run_id
        settings = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=run_name,
            job_type=stage,
            name=f"{run_name}-{stage}",
            id=run_id,
            resume="allow",
            dir=str(stage_dir),
            tags=cfg.tags or None,
            notes=cfg.notes,
            # Under one key: the Trainer's W&B callback writes its TrainingArguments (one of them is
            # `deepspeed`) at the top level of this same run's config and would overwrite ours.
            config={"pipeline": scrub(config)},
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        unreachable = wandb_reachable() if self.mode == "online" else None
        if unreachable:
            print(f"[{stage}] warning: W&B {unreachable}; logging offline instead", file=sys.stderr, flush=True)
            self.mode = "offline"
        try:
            self.run = wandb.init(mode=self.mode, **settings)
        except Exception as err:
            if self.mode != "online":
                raise
            # W&B unreachable: keep the run on disk and say once how to upload it later.
            print(f"[{stage}] warning: W&B online failed ({str(err).splitlines()[0]}); logging offline instead",
                  file=sys.stderr, flush=True)
            self.mode = "offline"
            self.run = wandb.init(mode="offline", **settings)

    def _guard(self, fn, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # the tracker going away must never stop training
            if not self._warned:
                print(f"[{self.stage}] warning: W&B logging failed ({err}); training continues", file=sys.stderr, flush=True)
                self._warned = True

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.file.write(metrics, step)
        self._guard(self.run.log, metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        self._guard(lambda: self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step))

    def summary(self, metrics: dict[str, Any]) -> None:
        self._guard(lambda: self.run.summary.update(metrics))

    def log_checkpoint(self, path: Path, metadata: dict[str, Any]) -> None:
        """With `tracking.log_checkpoint_artifact`: the stage's hand-off as a W&B model artifact, by reference
        (W&B records the path and the metadata; nothing is read or uploaded, however big the model)."""
        if not self.log_artifacts:
            return

        def log() -> None:
            name = re.sub(r"[^\w.-]", "-", f"{self.run_name}-{self.stage}")  # what W&B allows in a name
            artifact = self._wandb.Artifact(name, type="model", metadata=metadata)
            artifact.add_reference(path.resolve().as_uri(), checksum=False)
            self.run.log_artifact(artifact)

        self._guard(log)

    def finish(self) -> None:
        self._guard(self.run.finish)
        if self.mode == "offline":
            print(f"[{self.stage}] W&B run saved offline; upload with: wandb sync {self.run.dir.rsplit('/files', 1)[0]}",
                  flush=True)


def make_tracker(cfg: TrackingSection, *, rank: int, run_name: str, stage: str, stage_dir: Path,
                 config: dict[str, Any]):
    if rank != 0:
        return NullTracker()
    if cfg.backend == "none":
        return NullTracker(stage_dir / "metrics.jsonl")
    try:
        return WandbTracker(cfg, run_name=run_name, stage=stage, stage_dir=stage_dir, config=config)
    except Exception as err:
        print(f"[{stage}] warning: W&B could not start ({err}); continuing without tracking", file=sys.stderr, flush=True)
        return NullTracker(stage_dir / "metrics.jsonl")
