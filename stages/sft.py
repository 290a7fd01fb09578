"""Supervised fine-tuning: teach the model to answer prompts, with the loss on the answers only.

1. data: rows with `messages`, `prompt` + `completion` or `text` (pipeline/schemas.py), checked before
   anything else is loaded
2. tokenizer from the input checkpoint; the SFT arguments before the model (ZeRO-3 zero.Init)
3. model: the input causal LM (the previous stage's hand-off); LoRA adapters when `lora` is set
4. prompt/completion rows become chat turns when the tokenizer has a chat template (loss on the
   completion); `messages` rows are rendered by the template with the loss on every assistant turn;
   `text` rows train on every token; truncated to `max_length`, packed if asked, by TRL's SFTTrainer
   (DeepSpeed, checkpoints, resume, W&B come from the Trainer)
5. held-out loss; save the hand-off checkpoint (with LoRA: the merged model unless keep_adapters)
"""

from __future__ import annotations

from typing import Any

from pipeline.context import StageContext
from pipeline.chat import check_template_renders, encode_conversation, template_errors_named
from pipeline.data import StageRows, load_stage_rows
from pipeline.errors import DataError, UserError
from pipeline.hf_training import (checkpoint_callbacks, perplexity, resume_checkpoint, run_training, save_final,
                                  train_metrics, training_kwargs)
from pipeline.lora import check_targets, lora_config, save_final_lora
from pipeline.models import check_model_tokenizer, load_model, load_tokenizer


def load_split(ctx: StageContext, split: str) -> StageRows | None:
    """The `train` or `eval` rows in any SFT format (pipeline/schemas.py), every row checked."""
    return load_stage_rows(ctx.section.data, "sft", split=split, data_dir=ctx.run_dir.data_dir, what="sft")


def as_chat(rows):
    """Plain-string rows -> one user turn (the prompt) and one assistant turn (the completion)."""
    return rows.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                                 "completion": [{"role": "assistant", "content": row["completion"]}]})


def conversations(rows, tokenizer, source: str):
    """`messages` rows -> token ids with the loss on every assistant turn (`assistant_masks`), rendered by the
    tokenizer's own chat template."""
    from datasets import Dataset

    encoded = []
    for i, turns in enumerate(rows["messages"]):
        with template_errors_named(tokenizer, source, i + 1, "messages"):  # rendered here, once
            row = encode_conversation(tokenizer, turns)
        if row is None:
            raise DataError(f"{source}: row {i + 1}: field 'messages' has no assistant turn that follows another turn "
                            "and that the chat template renders as a prefix of the whole conversation")
        encoded.append(row)
    return Dataset.from_list(encoded)


def training_rows(data: StageRows, tokenizer):
    """Rows as TRL's SFTTrainer takes them: prompt/completion pairs (loss on the completion), token ids with
    an assistant mask (loss on every assistant turn), or plain text (loss on every token)."""
    rows, fmt = data.rows, data.format
    conversational = fmt == "messages" or (fmt == "prompt_completion" and not isinstance(rows[0]["prompt"], str))
    if conversational and not tokenizer.chat_template:
        raise UserError(f"{data.source}: rows are chat turns, but the tokenizer of sft.input ({tokenizer.name_or_path}) "
                        "has no chat template; give it one (tokenizer.chat_template) or use prompt/completion strings")
    if fmt == "messages":
        return conversations(rows, tokenizer, data.source)
    if fmt == "prompt_completion" and tokenizer.chat_template:
        rows = rows if conversational else as_chat(rows)
        check_template_renders(tokenizer, (p + c for p, c in zip(rows["prompt"], rows["completion"])), data.source,
                               "prompt' + 'completion")
    return rows  # chat pairs, plain text, or string pairs for a tokenizer without a chat template


def trained_example(row: dict[str, Any], tokenizer) -> dict[str, str]:
    """The first training sequence as the model sees it, and the part of it the loss is on, for the manifest:
    a user checks here that the chat template and the loss mask are what they meant."""
    ids = row["input_ids"]
    labels = row.get("labels") or ids
    return {"text": tokenizer.decode(ids), "trained": tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])}


def check_kept(trainer, given: dict[str, Any], cfg, is_main: bool) -> None:
    """TRL drops examples whose prompt alone fills max_length (nothing left to learn) without a word: refuse
    when all are gone, and say how many went otherwise. (Packed sequences do not count rows.)"""
    for split, rows in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if rows is None:
            continue
        if len(rows) == 0:
            raise UserError(f"sft.max_length: every {split} prompt fills max_length={cfg.max_length} tokens, "
                            "leaving no completion to train on; raise sft.max_length")
        dropped = len(given[split]) - len(rows)
        if dropped > 0 and not cfg.packing and is_main:
            print(f"[sft] warning: {dropped} of {len(given[split])} {split} rows left out: their prompt fills "
                  f"sft.max_length={cfg.max_length} tokens, leaving no completion to train on; raise sft.max_length "
                  "to keep them", flush=True)


def run(ctx: StageContext) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.section
    # 1. data
    train = load_split(ctx, "train")
    held_out = load_split(ctx, "eval")

    # 2. tokenizer and arguments; the arguments exist before the model so ZeRO-3 partitions it as it loads
    tokenizer = load_tokenizer(ctx.input_path("model"), what="sft.input", trust_remote_code=ctx.trust_remote_code)
    args = SFTConfig(
        **training_kwargs(ctx, cfg),
        max_length=cfg.max_length,
        packing=cfg.packing,
        completion_only_loss=True,
        activation_checkpointing=False,
    )

    # 3. model
    model = load_model(ctx.input_path("model"), what="sft.input", trust_remote_code=ctx.trust_remote_code)
    check_model_tokenizer(model, tokenizer, "sft")
    if cfg.lora is not None:
        check_targets(model, cfg.lora, "sft.lora")

    # 4. training rows in the form TRL takes (see training_rows), made once (rank 0 first, the other ranks reuse its cached result), and train
    with args.main_process_first(desc="sft data"):
        train_pairs = training_rows(train, tokenizer)
        eval_pairs = training_rows(held_out, tokenizer) if held_out is not None else None
    resume = resume_checkpoint(ctx)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs, processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "causal_lm") if cfg.lora is not None else None,
        callbacks=checkpoint_callbacks(ctx),
    )
    check_kept(trainer, {"train": train_pairs, "eval": eval_pairs}, cfg, ctx.is_main)
    ctx.extra_manifest["example"] = trained_example(trainer.train_dataset[0], tokenizer)
    run_training(trainer, resume)

    # 5. held-out loss on the trained weights, then the hand-off
    metrics: dict[str, Any] = {"train_rows": len(train.rows), "train_sequences": len(trainer.train_dataset)}
    metrics.update(train_metrics(trainer))
    if eval_pairs is not None:
        loss = trainer.evaluate()["eval_loss"]
        evaluated = len(eval_pairs) if cfg.packing else len(trainer.eval_dataset)  # rows TRL kept, as evaluated
        metrics.update(eval_loss=loss, eval_perplexity=perplexity(loss), eval_rows=evaluated)
    if cfg.lora is not None:
        save_final_lora(trainer, tokenizer, ctx, "causal_lm")
    else:
        save_final(trainer, tokenizer, ctx)
    return metrics
