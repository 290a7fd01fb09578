"""LoRA for the trained stages: the adapter config, and folding trained adapters into the base model.

Training wraps the model through TRL (`peft_config=`), which also handles ZeRO-3. The hand-off is
built afterwards on rank 0 from files, the same way for one rank or many and for any ZeRO stage:
`trainer.save_model` writes the consolidated adapter, which is loaded onto a fresh, whole copy of
the base checkpoint and merged (`merge_and_unload`), so no partitioned parameter is ever merged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import LoraSection
from pipeline.errors import UserError
from pipeline.models import load_model

ADAPTER_DIR = "adapter"  # where final/ keeps the trained adapters when they are merged
SCORE_HEAD = "score"  # the reward model's head: new, so it trains in full next to the adapters


def lora_config(section: LoraSection, kind: str):
    """The peft LoraConfig for a causal LM (`causal_lm`) or a one-output classifier (`seq_cls`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        task_type="CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS",
        modules_to_save=None if kind == "causal_lm" else [SCORE_HEAD],
    )


def check_targets(model, section: LoraSection, key: str) -> None:
    """Refuse target module names the model does not have, listing the names it does have."""
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in section.target_modules if t not in linear]
    if missing:
        raise UserError(f"{key}.target_modules: the model has no module named {missing[0]!r}; "
                        f"its linear layers are: {', '.join(linear)}")


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Load models whole in this process, even while a ZeRO-3 Trainer config is registered.

    Under ZeRO-3, transformers partitions every model loaded while the training arguments live
    (zero.Init), which needs all ranks to take part. Rank 0 alone loading a checkpoint to merge or
    score it must switch that off, then restore it.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_merged(base: str, adapter_dir: str | Path, kind: str, **model_kwargs: Any):
    """The base checkpoint with the adapters in `adapter_dir` merged into its weights (this process only)."""
    from peft import PeftModel

    with whole_model_loading():
        model = load_model(base, kind=kind, what="lora base", **model_kwargs)
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        return model.merge_and_unload()


def save_final_lora(trainer, tokenizer, ctx, kind: str, **model_kwargs: Any) -> None:
    """Write the hand-off of a LoRA run into the staging dir; all ranks call.

    With `keep_adapters` the hand-off is the adapters themselves; otherwise it is the base with the
    adapters merged, and the adapters are kept beside it in `adapter/`.
    """
    section: LoraSection = ctx.section.lora
    adapter_dir = ctx.staging_final if section.keep_adapters else ctx.staging_final / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))  # consolidated under ZeRO-3: adapters (+ score head) only
    if ctx.is_main:
        if not section.keep_adapters:
            merged = load_merged(ctx.input_path("model"), adapter_dir, kind, trust_remote_code=ctx.trust_remote_code,
                                  **model_kwargs)
            merged.save_pretrained(str(ctx.staging_final))
        tokenizer.save_pretrained(str(ctx.staging_final))
    ctx.extra_manifest["lora"] = {
        "merged": not section.keep_adapters,
        "adapter_dir": str(ctx.run_dir.final_dir(ctx.name) / ("" if section.keep_adapters else ADAPTER_DIR)),
        "base_model": ctx.input_path("model"),
        "r": section.r,
        "alpha": section.alpha,
        "target_modules": list(section.target_modules),
    }
