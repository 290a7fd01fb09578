"""Base pretraining: packed next-token prediction on plain text.

1. tokenizer: given, taken from the input checkpoint, or a byte-level BPE trained on the data
2. model: the input checkpoint (continued pretraining) or a new Llama-style model
3. data: texts -> <s> text </s> token stream -> blocks of `seq_len`
4. train with the Hugging Face Trainer (DeepSpeed, checkpoints, resume, W&B)
5. held-out perplexity before and after; save the hand-off checkpoint
"""

from __future__ import annotations

import itertools
from typing import Any

from transformers import TrainerCallback

from pipeline.checkpoint import read_json, write_json
from pipeline.config import stable_hash
from pipeline.context import StageContext
from pipeline.data import load_rows
from pipeline.hf_training import (checkpoint_callbacks, perplexity, resume_checkpoint, save_final, train_metrics,
                                  training_kwargs)
from pipeline.models import build_model, check_model_tokenizer, load_model, load_tokenizer, train_tokenizer
from pipeline.typed import to_dict
from pipeline.worker import barrier


def get_tokenizer(ctx: StageContext, texts):
    given = ctx.input_path("tokenizer") or ctx.input_path("model")
    if given:
        return load_tokenizer(given, what="pretrain.tokenizer", trust_remote_code=ctx.trust_remote_code)
    # Keyed by what shapes the tokenizer, so a changed vocab size or data never reuses a stale one.
    recipe = stable_hash([ctx.section.tokenizer_vocab_size, to_dict(ctx.section.data), to_dict(ctx.config.movie_reviews)])
    path = ctx.output_dir / f"tokenizer-{recipe}"
    if ctx.is_main and not (path / "tokenizer.json").exists():
        # Rank 0 trains it once; the other ranks load the same files, so every rank agrees on ids.
        tokenizer = train_tokenizer(texts, ctx.section.tokenizer_vocab_size)
        tokenizer.save_pretrained(str(path))
    barrier()
    return load_tokenizer(str(path), what="pretrain.tokenizer")


def pack(dataset, tokenizer, seq_len: int):
    """Concatenate `<s> text </s>` for every row and cut the stream into equal blocks."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [[tokenizer.bos_token_id, *x, tokenizer.eos_token_id] for x in ids]}

    def blocks(batch: dict[str, list]) -> dict[str, list]:
        stream = list(itertools.chain.from_iterable(batch["ids"]))
        n = len(stream) // seq_len * seq_len
        chunks = [stream[i : i + seq_len] for i in range(0, n, seq_len)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    return tokenized.map(blocks, batched=True, batch_size=1000, remove_columns=["ids"])


class KeepInitialEval(TrainerCallback):
    """Write the held-out perplexity measured before the first step to `path`."""

    def __init__(self, path):
        self.path = path

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0 and metrics and read_json(self.path) is None:
            write_json(self.path, {"initial_perplexity": perplexity(metrics["eval_loss"])})


def run(ctx: StageContext) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments, default_data_collator

    cfg = ctx.section
    train = load_rows(cfg.data, split="train", fields=["text"], data_dir=ctx.run_dir.data_dir, what="pretrain")
    held_out = load_rows(cfg.data, split="eval", fields=["text"], data_dir=ctx.run_dir.data_dir, what="pretrain")

    tokenizer = get_tokenizer(ctx, (row["text"] for row in train))
    args = TrainingArguments(**training_kwargs(ctx, cfg))  # before the model: ZeRO-3 init
    if ctx.input_path("model"):
        model = load_model(ctx.input_path("model"), what="pretrain.input", trust_remote_code=ctx.trust_remote_code)
    else:
        model = build_model(cfg.model, tokenizer, ctx.config.run.seed)
    check_model_tokenizer(model, tokenizer, "pretrain")

    with args.main_process_first(desc="pack pretraining data"):
        train_blocks = pack(train, tokenizer, cfg.seq_len)
        eval_blocks = pack(held_out, tokenizer, cfg.seq_len) if held_out is not None else None
    resume = resume_checkpoint(ctx)
    initial_file = ctx.output_dir / f"initial_eval-{ctx.config_hash}.json"
    # The held-out loss before the first step (eval_on_start) is kept in a file, so a resumed run
    # still reports the true starting perplexity.
    args.eval_on_start = eval_blocks is not None and read_json(initial_file) is None and resume is None
    trainer = Trainer(
        model=model, args=args, train_dataset=train_blocks, eval_dataset=eval_blocks,
        data_collator=default_data_collator, processing_class=tokenizer,
        callbacks=[*checkpoint_callbacks(ctx), *([KeepInitialEval(initial_file)] if ctx.is_main else [])],
    )
    metrics: dict[str, Any] = {"train_blocks": len(train_blocks), "seq_len": cfg.seq_len}
    trainer.train(resume_from_checkpoint=resume)
    metrics.update(read_json(initial_file) or {})
    metrics.update(train_metrics(trainer))
    metrics["parameters"] = metrics["sharding"]["engines"]["model"]["params_total"]  # whole, also under ZeRO-3
    if eval_blocks is not None:
        loss = trainer.evaluate()["eval_loss"]
        metrics.update(eval_loss=loss, perplexity=perplexity(loss))
    save_final(trainer, tokenizer, ctx)
    return metrics
