"""`rlhf status`: each stage's state, inputs, metrics, placement and checkpoints, from the run dir alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.checkpoint import complete_checkpoints
from pipeline.config import STAGE_ORDER
from pipeline.rundir import RunDir, completed_final, require_run_dir
from pipeline.sharding import describe as describe_sharding


def fmt_metrics(metrics: dict[str, Any], limit: int = 8) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" for k, v in items[:limit])


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
