"""Supervised fine-tuning: teach the model to answer prompts, with the loss on the answers only.

1. data: rows with `messages`, or `prompt` + `completion`, checked before anything else is loaded
2. tokenizer from the input checkpoint; the SFT arguments before the model (ZeRO-3 zero.Init)
3. model: the input causal LM (the previous stage's hand-off); LoRA adapters when `lora` is set
4. every row becomes a prompt/completion pair (chat turns when the tokenizer has a chat template),
   truncated to `max_length`, packed if asked; TRL's SFTTrainer trains on the completion tokens only
   (DeepSpeed, checkpoints, resume, W&B come from the Trainer)
5. held-out loss; save the hand-off checkpoint (with LoRA: the merged model unless keep_adapters)
"""

from __future__ import annotations

from typing import Any

from pipeline.context import StageContext
from pipeline.data import load_rows, resolve_source
from pipeline.errors import DataError, UserError
from pipeline.hf_training import (checkpoint_callbacks, perplexity, resume_checkpoint, run_training, save_final,
                                  train_metrics, training_kwargs)
from pipeline.lora import check_targets, lora_config, save_final_lora
from pipeline.models import check_model_tokenizer, load_model, load_tokenizer


def load_split(ctx: StageContext, split: str):
    """The `train` or `eval` rows, checked for the format they have: `messages`, else prompt+completion."""
    data, where = ctx.section.data, dict(split=split, data_dir=ctx.run_dir.data_dir, what="sft")
    # A first load that checks nothing but non-emptiness, to see which format the columns have.
    columns = load_rows(data, fields=[], optional_fields=("messages",), **where)
    if columns is None:
        return None
    fields = ["messages"] if "messages" in columns.column_names else ["prompt", "completion"]
    return load_rows(data, fields=fields, **where)


def split_conversation(rows, source: str):
    """`messages` -> prompt = every turn but the last, completion = the last turn, which must be the assistant's."""
    for i, row in enumerate(rows):
        turns = row["messages"]
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise DataError(f"{source}: row {i + 1}: field 'messages' must end with an assistant turn that follows "
                            "at least one other turn (the last turn is what SFT learns to write)")
    return rows.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                    remove_columns=["messages"])


def as_chat(rows):
    """Plain-string rows -> one user turn (the prompt) and one assistant turn (the completion)."""
    return rows.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                                 "completion": [{"role": "assistant", "content": row["completion"]}]})


def prompt_completion(rows, tokenizer, source: str):
    """Every row as a prompt/completion pair, so TRL puts the loss on the completion only."""
    if not tokenizer.chat_template and ("messages" in rows.column_names or not isinstance(rows[0]["prompt"], str)):
        raise UserError(f"{source}: rows are chat turns, but the tokenizer of sft.input ({tokenizer.name_or_path}) "
                        "has no chat template; give it one (tokenizer.chat_template) or use prompt/completion strings")
    if "messages" in rows.column_names:
        return split_conversation(rows, source)
    if tokenizer.chat_template and isinstance(rows[0]["prompt"], str):
        return as_chat(rows)
    return rows  # already conversational pairs, or plain text for a tokenizer without a chat template


def check_not_empty(trainer, max_length: int) -> None:
    """TRL drops examples whose prompt alone fills max_length (nothing left to learn): refuse when all are gone."""
    for split, rows in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if rows is not None and len(rows) == 0:
            raise UserError(f"sft.max_length: every {split} prompt fills max_length={max_length} tokens, "
                            "leaving no completion to train on; raise sft.max_length")


def run(ctx: StageContext) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.section
    # 1. data
    train = load_split(ctx, "train")
    held_out = load_split(ctx, "eval")

    # 2. tokenizer and arguments; the arguments exist before the model so ZeRO-3 partitions it as it loads
    tokenizer = load_tokenizer(ctx.input_path("model"), what="sft.input")
    args = SFTConfig(
        **training_kwargs(ctx, cfg),
        max_length=cfg.max_length,
        packing=cfg.packing,
        completion_only_loss=True,
        activation_checkpointing=False,
    )

    # 3. model
    model = load_model(ctx.input_path("model"), what="sft.input")
    check_model_tokenizer(model, tokenizer, "sft")
    if cfg.lora is not None:
        check_targets(model, cfg.lora, "sft.lora")

    # 4. prompt/completion pairs, made once (rank 0 first, the other ranks reuse its cached result), and train
    data_dir = ctx.run_dir.data_dir
    with args.main_process_first(desc="sft data"):
        train_pairs = prompt_completion(train, tokenizer, resolve_source(cfg.data.train, data_dir))
        eval_pairs = (prompt_completion(held_out, tokenizer, resolve_source(cfg.data.eval, data_dir))
                      if held_out is not None else None)
    resume = resume_checkpoint(ctx)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs, processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "causal_lm") if cfg.lora is not None else None,
        callbacks=checkpoint_callbacks(ctx),
    )
    check_not_empty(trainer, cfg.max_length)
    run_training(trainer, resume)

    # 5. held-out loss on the trained weights, then the hand-off
    metrics: dict[str, Any] = {"train_rows": len(train), "train_sequences": len(trainer.train_dataset)}
    metrics.update(train_metrics(trainer))
    if eval_pairs is not None:
        loss = trainer.evaluate()["eval_loss"]
        metrics.update(eval_loss=loss, eval_perplexity=perplexity(loss), eval_rows=len(eval_pairs))
    if cfg.lora is not None:
        save_final_lora(trainer, tokenizer, ctx, "causal_lm")
    else:
        save_final(trainer, tokenizer, ctx)
    return metrics
