"""What a running stage is handed: its config, inputs, rank, tracker and where to write."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DeepSpeedSection, PipelineConfig
from pipeline.rundir import RunDir


@dataclass
class StageContext:
    name: str
    config: PipelineConfig
    run_dir: RunDir
    inputs: dict[str, dict[str, Any] | None]
    config_hash: str
    deepspeed: DeepSpeedSection
    tracker: Any  # pipeline.tracking.Tracker
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    resume_from: Path | None = None
    force_resume: bool = False  # resume even if the checkpoint's stage config differs
    started_at: str = ""
    extra_manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def section(self) -> Any:
        return self.config.stage(self.name)

    @property
    def output_dir(self) -> Path:
        return self.run_dir.stage_dir(self.name)

    @property
    def staging_final(self) -> Path:
        """Where the stage writes its final checkpoint before the worker publishes it as `final/`."""
        return self.output_dir / ".tmp-final"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def input_path(self, key: str) -> str | None:
        entry = self.inputs.get(key)
        return None if entry is None else entry["path"]

    @property
    def trust_remote_code(self) -> bool:
        """run.trust_remote_code: whether checkpoints may bring their own model code (off by default)."""
        return self.config.run.trust_remote_code

    @property
    def device(self) -> str:
        return "cpu" if os.environ.get("DS_ACCELERATOR") == "cpu" else f"cuda:{self.local_rank}"
