"""Shared glue for the stages that train through the Hugging Face Trainer (pretrain, SFT, reward).

They get checkpointing, resume, DeepSpeed and W&B logging from the Trainer; this module turns
our typed stage config into TrainingArguments, finds the checkpoint to resume from, and writes
the final hand-off checkpoint.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pipeline import ds_config
from pipeline.config import TrainLoop
from pipeline.context import StageContext
from pipeline.tracking import MetricsFile, NullTracker

from transformers import TrainerCallback


def deepspeed_dict(ctx: StageContext, section: TrainLoop) -> dict[str, Any]:
    return ds_config.resolve(
        ctx.deepspeed.config,
        micro_batch=section.batch_size,
        grad_accum=section.grad_accum,
        world_size=ctx.world_size,
        max_grad_norm=section.max_grad_norm,
        key=f"{ctx.name}.deepspeed.config",
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
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps" if section.save_steps else "no",
        save_steps=section.save_steps or 500,
        save_total_limit=section.keep_checkpoints,
        seed=ctx.config.run.seed,
        data_seed=ctx.config.run.seed,
        report_to=[] if isinstance(ctx.tracker, NullTracker) else ["wandb"],
        deepspeed=ds,
        bf16=bool(ds["bf16"]["enabled"]),
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


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` (one the Trainer finished: it has trainer_state.json)."""
    done = [
        p for p in stage_dir.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").exists()
    ]
    return max(done, key=checkpoint_step) if done else None


def resume_checkpoint(ctx: StageContext) -> str | None:
    if ctx.resume_from is not None:
        return str(ctx.resume_from)
    latest = latest_checkpoint(ctx.output_dir)
    return str(latest) if latest else None


def save_final(trainer, tokenizer, ctx: StageContext) -> None:
    """Write the hand-off checkpoint (consolidated under ZeRO-3) into the staging dir; all ranks call."""
    trainer.save_model(str(ctx.staging_final))
    if ctx.is_main:
        tokenizer.save_pretrained(str(ctx.staging_final))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def train_metrics(trainer) -> dict[str, Any]:
    """The last logged training loss and the run's step count, from the Trainer's history."""
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    return {"train_loss": losses[-1] if losses else float("nan"), "steps": trainer.state.global_step}
