"""Save the trained actor as a plain Hugging Face checkpoint (the PPO stage's hand-off).

Under ZeRO-3 the shards are gathered into one state dict (all ranks take part, rank 0 writes).
A LoRA actor is merged into its base unless the config keeps adapters; an EMA, when kept, is
written beside it as `final/ema/`.
"""

from __future__ import annotations

import torch

from pipeline.context import StageContext
from pipeline.models import load_model


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The engine's module weights, consolidated under ZeRO-3; only rank 0 gets them there."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def _merged_lora(ctx: StageContext, state: dict[str, torch.Tensor]):
    from peft import LoraConfig, get_peft_model

    lora = ctx.section.lora
    base = load_model(ctx.input_path("actor"), what="ppo.input", trust_remote_code=ctx.trust_remote_code)
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    model.load_state_dict(state, strict=False)
    return model.merge_and_unload()


def save_actor(models, tokenizer, ctx: StageContext, ema=None) -> None:
    """`final/`: the actor as the config asks (plain, LoRA merged, or LoRA adapters); `final/ema/`, when an EMA
    is kept: its weights in the same form, with the tokenizer, so either loads the same way."""
    state = full_state_dict(models.actor)
    if not ctx.is_main:
        return
    merge = models.uses_lora and not ctx.section.lora.keep_adapters
    if models.uses_lora:
        ctx.extra_manifest["lora"] = {"merged": True} if merge else {"merged": False, "adapters_only": True}
    tokenizer.padding_side = "right"
    _save(models.actor.module, state, ctx, merge, tokenizer, ctx.staging_final)
    if ema is not None:
        # the EMA holds the trainable weights only (the adapters under LoRA); the rest is the actor's
        ema_state = {**state, **{k: v.detach().cpu() for k, v in ema.shadow.items()}}
        _save(models.actor.module, ema_state, ctx, merge, tokenizer, ctx.staging_final / "ema")
        ctx.extra_manifest["ema"] = {"decay": ema.decay, "path": str(ctx.run_dir.final_dir("ppo") / "ema")}


def _save(module, state: dict[str, torch.Tensor], ctx: StageContext, merge: bool, tokenizer, out) -> None:
    if merge:
        module, state = _merged_lora(ctx, state), None
    module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
