"""Shared glue for the stages that train through the Hugging Face Trainer (pretrain, SFT, reward).

They get checkpointing, resume, DeepSpeed and W&B logging from the Trainer; this module turns
our typed stage config into TrainingArguments, finds the checkpoint to resume from, and writes
the final hand-off checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from pipeline import ds_config
from pipeline.checkpoint import (check_finite, check_resumable, fault_point, open_checkpoint, read_json, resume_point,
                                 seal_checkpoint)
from pipeline.config import TrainLoop
from pipeline.context import StageContext
from pipeline.tracking import MetricsFile, NullTracker
from pipeline.worker import barrier

from transformers import TrainerCallback


def deepspeed_dict(ctx: StageContext, section: TrainLoop) -> dict[str, Any]:
    return ds_config.resolve(
        ctx.deepspeed.config,
        micro_batch=section.batch_size,
        grad_accum=section.grad_accum,
        world_size=ctx.world_size,
        max_grad_norm=section.max_grad_norm,
        key=f"{ctx.name}.deepspeed.config",
        precision=ctx.deepspeed.precision,
    )


def training_kwargs(ctx: StageContext, section: TrainLoop) -> dict[str, Any]:
    """Keyword arguments shared by TrainingArguments and TRL's SFTConfig/RewardConfig.

    Create the arguments object before loading a model: under ZeRO-3 it registers the DeepSpeed
    config so `from_pretrained` / `from_config` partition weights as they load (zero.Init)
    instead of materialising the whole model on every rank.
    """
    ds = deepspeed_dict(ctx, section)
    eval_every = section.eval_steps
    return dict(
        output_dir=str(ctx.output_dir),
        max_steps=section.max_steps,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        learning_rate=section.lr,
        weight_decay=section.weight_decay,
        warmup_steps=section.warmup_steps,
        lr_scheduler_type=section.lr_scheduler,
        max_grad_norm=section.max_grad_norm,
        logging_steps=section.logging_steps,
        logging_nan_inf_filter=False,  # else a NaN/inf step is logged as the mean of its window, unseen
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps" if section.save_steps else "no",
        save_steps=section.save_steps or 500,
        save_total_limit=None,  # rotation happens after every rank finished (CompleteCheckpoints)
        seed=ctx.config.run.seed,
        data_seed=ctx.config.run.seed,
        report_to=[] if isinstance(ctx.tracker, NullTracker) else ["wandb"],
        deepspeed=ds,
        bf16=bool(ds["bf16"]["enabled"]),
        fp16=bool(ds.get("fp16", {}).get("enabled", False)),
        use_cpu=ctx.device == "cpu",
        ddp_backend="gloo" if ctx.device == "cpu" else None,
        dataloader_num_workers=0,
        disable_tqdm=not ctx.is_main,
        remove_unused_columns=False,
        save_only_model=False,
    )


class MetricsFileCallback(TrainerCallback):
    """Mirror the Trainer's logs into `<stage>/metrics.jsonl` (rank 0), with train/ and eval/ prefixes."""

    def __init__(self, ctx: StageContext):
        self.file = MetricsFile(ctx.output_dir / "metrics.jsonl" if ctx.is_main else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.file.write({k if k.startswith(("eval_", "train_")) else f"train/{k}": v
                             for k, v in logs.items()}, state.global_step)


class ProgressLines(TrainerCallback):
    """The terminal's view of the stage, one line per log on rank 0 (the Trainer's progress bars and
    dicts stay in the stage's log): `[sft] step 20/200 loss 2.345 grad_norm 0.5213 lr 0.000933 0.41s/step`."""

    KEYS = ("loss", "eval_loss", "accuracy", "eval_accuracy", "grad_norm", "learning_rate")

    def __init__(self, ctx: StageContext):
        self.name, self.is_main = ctx.name, ctx.is_main
        self.started, self.first_step = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = [k for k in self.KEYS if k in (logs or {})]
        if not self.is_main or not shown:  # the end-of-training summary has none of them
            return
        values = " ".join(f"{'lr' if k == 'learning_rate' else k} {logs[k]:.4g}" for k in shown)
        steps = state.global_step - self.first_step
        pace = f" {(time.perf_counter() - self.started) / steps:.2f}s/step" if steps else ""
        print(f"[{self.name}] step {state.global_step}/{state.max_steps} {values}{pace}", flush=True)


class CompleteCheckpoints(TrainerCallback):
    """The Trainer's checkpoints under the one protocol of `pipeline.checkpoint` (open, write, seal).

    The Trainer writes `checkpoint-N` in place and rank 0 may finish (and rotate old ones away) while
    other ranks still write their ZeRO shards. `on_step_end` of a save step, before the Trainer writes,
    withdraws an old marker from `checkpoint-N`; `on_save` runs on each rank after its own save and
    seals the checkpoint once every rank is there.

    Every save step also closes a logging window (FiniteLossGuard.on_step_end): a resumed Trainer
    starts a new window at its checkpoint's step, so a window spanning it would log a different
    mean loss after a resume.
    """

    def __init__(self, ctx: StageContext, stage_config: dict[str, Any]):
        self.ctx = ctx
        self.stage_config = stage_config

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # set by the Trainer's own flow callback, which runs before this one
            open_checkpoint(self._path(state), self.ctx.is_main, barrier)

    def on_save(self, args, state, control, **kwargs):
        fault_point(self.ctx.name, state.global_step, "writing")  # tests only: every file but the marker
        seal_checkpoint(self._path(state), {"step": state.global_step, "world_size": self.ctx.world_size,
                                            "config_hash": self.ctx.config_hash, "stage_config": self.stage_config},
                        self.ctx.is_main, barrier, self.ctx.section.keep_checkpoints)
        fault_point(self.ctx.name, state.global_step, "saved")

    def _path(self, state) -> Path:
        return self.ctx.output_dir / f"checkpoint-{state.global_step}"


class FiniteLossGuard(TrainerCallback):
    """Stop on the first NaN/inf loss or gradient norm, naming the step and the last good checkpoint.

    Every save step logs first (the Trainer logs, then saves), so a checkpoint is written only once
    the loss of every step since the previous log was seen to be finite: a diverged model never
    becomes a checkpoint, nor pushes the last good one out of the rotation.
    """

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        fp16 = deepspeed_dict(ctx, ctx.section).get("fp16", {}).get("enabled") is True
        # fp16 loss scaling skips overflowing steps on purpose: an inf gradient norm is expected there
        self.keys = ("loss", "eval_loss") if fp16 else ("loss", "grad_norm", "eval_loss")

    def on_step_end(self, args, state, control, **kwargs):
        # set by the Trainer's own flow callback, which runs first; closing the logging window here
        # also keeps logged losses identical across a resume (see CompleteCheckpoints). The last step
        # logs too: the hand-off checkpoint is saved after it, and the manifest reports its loss.
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        check_finite(self.ctx.name, {k: (logs or {}).get(k) for k in self.keys}, state.global_step,
                     self.ctx.output_dir)


def resume_checkpoint(ctx: StageContext) -> str | None:
    """`--from` if given, else the newest complete checkpoint of this stage; checked before use, and said."""
    from pipeline.rundir import semantic_stage_config

    stage_config = semantic_stage_config(ctx.config, ctx.name)
    path = resume_point(ctx.resume_from, ctx.output_dir)
    if path is None:
        return None
    check_resumable(path, ctx.name, ctx.config_hash, stage_config, ctx.world_size, ctx.force_resume)
    if ctx.is_main:
        print(f"[{ctx.name}] resuming from {path}", flush=True)
    return str(path)


def run_training(trainer, resume: str | None) -> None:
    """`trainer.train`, continuing from checkpoint `resume` if given, TRL's token count included.

    TRL's trainers log `num_tokens` from a counter that starts at 0 in every process, so after a
    resume it would count the resumed part only. Every save step is a logging step
    (CompleteCheckpoints), so the checkpoint's own log history holds the count at its step.
    """
    if resume is not None and hasattr(trainer, "_total_train_tokens"):
        state = read_json(Path(resume) / "trainer_state.json") or {}
        at_step = [h["num_tokens"] for h in state.get("log_history", [])
                   if "num_tokens" in h and h.get("step") == state.get("global_step")]
        if at_step:
            trainer._total_train_tokens = at_step[-1]
    trainer.train(resume_from_checkpoint=resume)


def checkpoint_callbacks(ctx: StageContext) -> list[TrainerCallback]:
    from pipeline.rundir import semantic_stage_config

    return [MetricsFileCallback(ctx), CompleteCheckpoints(ctx, semantic_stage_config(ctx.config, ctx.name)),
            FiniteLossGuard(ctx), ProgressLines(ctx)]


def save_final(trainer, tokenizer, ctx: StageContext) -> None:
    """Write the hand-off checkpoint (consolidated under ZeRO-3) into the staging dir; all ranks call."""
    trainer.save_model(str(ctx.staging_final))
    if ctx.is_main:
        tokenizer.save_pretrained(str(ctx.staging_final))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def train_metrics(trainer) -> dict[str, Any]:
    """The last logged training loss, the run's step count and what each rank held (pipeline.sharding).

    Every rank calls it after training: the sharding measurement gathers over ranks.
    """
    from pipeline import sharding

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    return {"train_loss": losses[-1] if losses else float("nan"), "steps": trainer.state.global_step,
            "sharding": sharding.report({"model": trainer.model_wrapped})}  # the DeepSpeed engine
