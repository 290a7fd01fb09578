"""Reward modelling: learn a scalar score that ranks the chosen response above the rejected one.

1. data: `chosen` + `rejected` (+ optional `prompt`) as strings or chat turns, whole conversations, or
   Anthropic HH text (pipeline/schemas.py), checked before anything else is loaded
2. tokenizer from the input checkpoint; the reward arguments before the model (ZeRO-3 zero.Init)
3. model: the input causal LM as a one-output sequence classifier (a new `score` head); LoRA if set
4. plain rows with a prompt become chat turns when the tokenizer has a chat template; identical
   pairs are counted; TRL's RewardTrainer trains on -log sigmoid(r_chosen - r_rejected)
5. save the hand-off; then, on rank 0, score the held-out pairs with the saved model: pairwise
   accuracy (share with r_chosen > r_rejected), mean margin and loss
"""

from __future__ import annotations

from typing import Any

from pipeline.context import StageContext
from pipeline.chat import check_template_renders
from pipeline.data import StageRows, load_stage_rows
from pipeline.errors import UserError
from pipeline.hf_training import (checkpoint_callbacks, resume_checkpoint, run_training, save_final, train_metrics,
                                  training_kwargs)
from pipeline.lora import check_targets, load_merged, lora_config, save_final_lora, whole_model_loading
from pipeline.models import check_model_tokenizer, load_model, load_tokenizer


def load_split(ctx: StageContext, split: str) -> StageRows | None:
    """The `train` or `eval` pairs in any reward format (pipeline/schemas.py), every row checked."""
    return load_stage_rows(ctx.section.data, "reward", split=split, data_dir=ctx.run_dir.data_dir, what="reward")


def as_chat(rows):
    """Plain-string rows with a prompt -> the prompt as a user turn, each response as an assistant turn."""
    def turn(role: str, text: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text}]

    return rows.map(lambda row: {"prompt": turn("user", row["prompt"]), "chosen": turn("assistant", row["chosen"]),
                                 "rejected": turn("assistant", row["rejected"])})


def identical_pairs(rows) -> int:
    """Rows whose chosen and rejected responses are the same; they carry no preference."""
    return sum(c == r for c, r in zip(rows["chosen"], rows["rejected"]))


def prepare(data: StageRows | None, tokenizer, split: str, is_main: bool):
    """Pairs as TRL's RewardTrainer takes them: explicit-prompt string pairs become chat turns when the tokenizer
    has a chat template; whole conversations (`conversations`, `hh`) need one."""
    if data is None:
        return None
    rows = data.rows
    same = identical_pairs(rows)
    if same and is_main:
        print(f"[reward] warning: {same} of {len(rows)} {split} pairs have chosen == rejected "
              "(no preference signal); they are kept", flush=True)
    conversational = not isinstance(rows[0]["chosen"], str)
    if conversational and not tokenizer.chat_template:
        raise UserError(f"{data.source}: pairs are chat turns (format '{data.format}'), but the tokenizer of "
                        f"reward.input ({tokenizer.name_or_path}) has no chat template; give it one")
    if tokenizer.chat_template and "prompt" in rows.column_names and isinstance(rows[0]["prompt"], str):
        rows = as_chat(rows)
    if not isinstance(rows[0]["chosen"], str):
        prompts = rows["prompt"] if "prompt" in rows.column_names else [[]] * len(rows)
        for field in ("chosen", "rejected"):
            check_template_renders(tokenizer, (p + r for p, r in zip(prompts, rows[field])), data.source, field)
    return rows


def check_input_head(path: str) -> None:
    """Refuse an input that already is a classifier with more than one output."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return  # load_model reports an unloadable checkpoint with its own message
    is_classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if is_classifier and config.num_labels != 1:
        raise UserError(f"reward.input: {path} is a sequence classifier with {config.num_labels} outputs; "
                        "a reward model needs one (start from a causal LM or a one-output classifier)")


def check_lengths(trainer, train, held_out, max_length: int, is_main: bool) -> None:
    """RewardTrainer drops pairs longer than max_length: say how many, and refuse when none is left."""
    for split, rows, kept in (("train", train, trainer.train_dataset), ("eval", held_out, trainer.eval_dataset)):
        if rows is None:
            continue
        if len(kept) == 0:
            raise UserError(f"reward.max_length: all {len(rows)} {split} pairs are longer than {max_length} tokens; "
                            "raise reward.max_length")
        if len(kept) < len(rows) and is_main:
            print(f"[reward] {len(rows) - len(kept)} of {len(rows)} {split} pairs are longer than "
                  f"max_length={max_length} tokens and are left out", flush=True)


def pairwise_metrics(chosen, rejected) -> dict[str, float]:
    """Accuracy (share of pairs with r_chosen > r_rejected), mean margin and mean -log sigmoid(margin)."""
    import torch.nn.functional as F

    margin = chosen - rejected
    return {"eval_accuracy": (margin > 0).float().mean().item(), "eval_margin": margin.mean().item(),
            "eval_loss": -F.logsigmoid(margin).mean().item()}


def score(model, sequences: list[list[int]], pad_id: int, batch_size: int):
    """The reward of each token-id sequence, in order (right-padded batches)."""
    import torch

    scores = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            batch = sequences[i : i + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
            scores.append(model(input_ids=ids, attention_mask=mask).logits[:, 0].float())
    return torch.cat(scores)


def held_out_metrics(ctx: StageContext, pairs, tokenizer) -> dict[str, Any]:
    """Score the (tokenized) held-out pairs with the saved hand-off model, in this process only."""
    cfg = ctx.section
    head = dict(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    if cfg.lora is not None and cfg.lora.keep_adapters:
        model = load_merged(ctx.input_path("model"), ctx.staging_final, "seq_cls", trust_remote_code=ctx.trust_remote_code, **head)
    else:
        with whole_model_loading():
            model = load_model(str(ctx.staging_final), kind="seq_cls", what="reward final checkpoint")
    model.eval()
    chosen = score(model, pairs["chosen_ids"], tokenizer.pad_token_id, cfg.batch_size)
    rejected = score(model, pairs["rejected_ids"], tokenizer.pad_token_id, cfg.batch_size)
    return {**pairwise_metrics(chosen, rejected), "eval_pairs": len(pairs)}


def run(ctx: StageContext) -> dict[str, Any]:
    from trl import RewardConfig, RewardTrainer

    cfg = ctx.section
    # 1. data
    train = load_split(ctx, "train")
    held_out = load_split(ctx, "eval")

    # 2. tokenizer and arguments; the arguments exist before the model so ZeRO-3 partitions it as it loads
    tokenizer = load_tokenizer(ctx.input_path("model"), what="reward.input", trust_remote_code=ctx.trust_remote_code)
    args = RewardConfig(**training_kwargs(ctx, cfg), max_length=cfg.max_length, activation_checkpointing=False)

    # 3. model: a new one-output `score` head on the input model's body
    check_input_head(ctx.input_path("model"))
    head = dict(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = load_model(ctx.input_path("model"), kind="seq_cls", what="reward.input", trust_remote_code=ctx.trust_remote_code,
                       **head)
    check_model_tokenizer(model, tokenizer, "reward")
    if cfg.lora is not None:
        check_targets(model, cfg.lora, "reward.lora")

    # 4. the pairs as chat turns, made once (rank 0 first, the other ranks reuse its cached result), and train
    with args.main_process_first(desc="reward data"):
        train_pairs = prepare(train, tokenizer, "train", ctx.is_main)
        eval_pairs = prepare(held_out, tokenizer, "eval", ctx.is_main)
    resume = resume_checkpoint(ctx)
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs, processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "seq_cls") if cfg.lora is not None else None,
        callbacks=checkpoint_callbacks(ctx),
    )
    check_lengths(trainer, train_pairs, eval_pairs, cfg.max_length, ctx.is_main)
    run_training(trainer, resume)

    # 5. hand-off, then held-out metrics of exactly what was handed off
    if cfg.lora is not None:
        save_final_lora(trainer, tokenizer, ctx, "seq_cls", **head)
    else:
        save_final(trainer, tokenizer, ctx)
    metrics: dict[str, Any] = {"train_pairs": len(trainer.train_dataset), "identical_pairs": identical_pairs(train.rows)}
    metrics.update(train_metrics(trainer))
    if trainer.eval_dataset is not None and ctx.is_main:
        metrics.update(held_out_metrics(ctx, trainer.eval_dataset, tokenizer))
    return metrics
