"""What the process the DeepSpeed launcher starts on every rank does: run one stage of a run dir.

    python -m deepspeed.launcher.runner ... --module stages.worker --run-dir RUN --stage sft

`stages/worker.py` is that module: it hands this one the stage's `run`, so the infrastructure
here never imports a stage. It reads the resolved config the orchestrator wrote, finds the stage's inputs through the
previous manifests, runs the stage, and (rank 0) publishes `final/` with its manifest.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from pipeline.checkpoint import make_manifest, now, publish_dir, slow_finish, write_json
from pipeline.config import load_config
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.rundir import RunDir, semantic_stage_config, stage_fingerprint, stage_inputs
from pipeline.tracking import make_tracker
from pipeline.typed import to_dict

# A stage's entry: `run(ctx) -> metrics` (stages/__init__.py).
StageRun = Callable[[StageContext], dict[str, Any]]


def init_distributed() -> tuple[int, int, int]:
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else None
        deepspeed.init_distributed(dist_backend=backend) if backend else deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


# How long the other ranks wait for rank 0 at a stage's end (its evaluation, writing final/). Not the
# process group's timeout (DeepSpeed's default: 10 minutes), which an evaluation of many prompts on a big
# model outlasts; a rank that dies still ends the wait at once, as its connections close.
FINISH_TIMEOUT = timedelta(hours=12)


def finish_group(world_size: int):
    """A gloo group with FINISH_TIMEOUT for the collectives after a stage's training (call on every rank);
    None on one rank."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT) if world_size > 1 else None


def placement(world_size: int, group=None) -> dict[str, Any]:
    """Where the ranks ran, for the manifest: `{nodes, ranks_per_node, node_of_rank, hosts}` (call on every rank).

    A rank's node is the number DeepSpeed's launcher gives it (CROSS_RANK, set on every node, so two
    "nodes" on one machine count as two), or its host name where a launcher sets none.
    """
    import torch.distributed as dist

    mine = (os.environ.get("CROSS_RANK") or socket.gethostname(), socket.gethostname())
    ranks: list[Any] = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(ranks, mine, group=group)
    else:
        ranks = [mine]
    order = list(dict.fromkeys(node for node, _ in ranks))  # nodes in order of their first rank
    node_of_rank = [order.index(node) for node, _ in ranks]
    return {"nodes": len(order), "ranks_per_node": [node_of_rank.count(n) for n in range(len(order))],
            "node_of_rank": node_of_rank, "hosts": [host for _, host in ranks]}


def barrier(group=None) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=group)


def run_stage(run_dir: RunDir, stage: str, stage_run: StageRun, resume_from: Path | None,
              force_resume: bool = False) -> None:
    cfg = load_config(run_dir.config_path)
    inputs = stage_inputs(cfg, stage, run_dir)
    fingerprint = stage_fingerprint(cfg, stage, inputs)
    rank, world_size, local_rank = init_distributed()

    import transformers

    transformers.set_seed(cfg.run.seed)
    tracker = make_tracker(
        cfg.tracking, rank=rank, run_name=cfg.run.name, stage=stage, stage_dir=run_dir.stage_dir(stage),
        config={"run": to_dict(cfg.run), stage: to_dict(cfg.stage(stage)),
                "deepspeed": to_dict(cfg.stage_deepspeed(stage)), "config_hash": fingerprint},
    )
    ctx = StageContext(
        name=stage, config=cfg, run_dir=run_dir, inputs=inputs, config_hash=fingerprint,
        deepspeed=cfg.stage_deepspeed(stage), tracker=tracker, rank=rank, world_size=world_size,
        local_rank=local_rank, resume_from=resume_from, force_resume=force_resume, started_at=now(),
    )
    if ctx.is_main and ctx.staging_final.exists():
        shutil.rmtree(ctx.staging_final)  # left by a crash; never a published checkpoint
    finishing = finish_group(world_size)
    barrier()

    metrics = stage_run(ctx)
    if ctx.is_main:
        slow_finish(stage)  # tests only: rank 0 finishes late

    # Rank 0 may still be evaluating (PPO): the others wait for it here, on the group that waits long enough.
    where = placement(world_size, finishing)
    barrier(finishing)
    if ctx.is_main:
        manifest = make_manifest(
            stage=stage, config_hash=fingerprint, stage_config=semantic_stage_config(cfg, stage),
            inputs=inputs, metrics=metrics, started_at=ctx.started_at, world_size=world_size,
            extra={"checkpoint": str(run_dir.final_dir(stage)), "run_name": cfg.run.name,
                   "wandb_run_id": tracker.run_id, "placement": where, **ctx.extra_manifest},
        )
        write_json(ctx.staging_final / "manifest.json", manifest)
        publish_dir(ctx.staging_final, run_dir.final_dir(stage))
        tracker.summary({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_checkpoint(run_dir.final_dir(stage), {"stage": stage, "config_hash": fingerprint,
                                                          "run_name": cfg.run.name})
    tracker.finish()
    barrier(finishing)
    import torch.distributed as dist

    # A rank that exits while another still runs collectives can abort the job ("terminate called
    # without an active exception"); leave together.
    if dist.is_initialized():
        dist.destroy_process_group()


def is_write_failure(err: BaseException) -> bool:
    """Disk full or over quota: an OSError, or torch.save's RuntimeError from its C++ file writer."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and "PytorchStreamWriter failed writing" in str(err)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_full_message(run_dir: Path, stage: str, err: BaseException) -> str:
    """Where the write failed, how much a checkpoint of this stage takes, and how much is free."""
    from pipeline.checkpoint import complete_checkpoints

    stage_dir = RunDir(run_dir).stage_dir(stage)
    filename = getattr(err, "filename", None)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else "write failed"
    previous = complete_checkpoints(stage_dir)
    if previous:
        needed = f"a checkpoint needs about {_size(previous[-1]) / 2**20:.1f} MiB"
    else:  # the first save: what it had written before the failure is a lower bound
        failed = next((p for p in Path(filename).parents if p.parent == stage_dir), None) if filename else None
        needed = (f"a checkpoint needs more than {_size(failed) / 2**20:.1f} MiB" if failed
                  else "checkpoint size unknown (none saved yet)")
    free = shutil.disk_usage(stage_dir if stage_dir.exists() else run_dir).free
    kept = f"; last good checkpoint kept: {previous[-1]}" if previous else ""
    return f"{stage}: {reason} writing {filename or stage_dir}: {needed}, {free / 2**20:.1f} MiB free{kept}"


def main(argv: list[str] | None, stage_runs: Callable[[str], StageRun]) -> None:
    """Parse the launcher's arguments and run the stage `stage_runs(name)` gives, exiting 2 on bad input."""
    parser = argparse.ArgumentParser(prog="stages.worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--force-resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the DeepSpeed launcher
    args = parser.parse_args(argv)
    try:
        run_stage(RunDir(Path(args.run_dir)), args.stage, stage_runs(args.stage),
                  Path(args.resume_from) if args.resume_from else None, args.force_resume)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        if os.environ.get("RLHF_DEBUG"):
            traceback.print_exc()
        sys.exit(err.exit_code)
    except (OSError, RuntimeError) as err:
        if not is_write_failure(err):
            raise
        print(f"error: {disk_full_message(Path(args.run_dir), args.stage, err)}", file=sys.stderr)
        if os.environ.get("RLHF_DEBUG"):
            traceback.print_exc()
        sys.exit(UserError.exit_code)
