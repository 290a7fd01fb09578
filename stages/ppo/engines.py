"""The four PPO models as DeepSpeed engines: actor, critic (trained), reference, reward (frozen).

The critic and the reward model share one shape: a sequence classifier whose one-output `score`
head is applied to every position (`TokenValueModel`). The critic reads a value per token; the
reward model reads the value at the last real token, exactly where the reward trainer pooled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from pipeline import ds_config
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.models import check_model_tokenizer, load_model
from pipeline.scoring import TokenValueModel


@contextlib.contextmanager
def zero3_init(ds: dict[str, Any]) -> Iterator[None]:
    """While loading, let `from_pretrained` partition weights on arrival (zero.Init) under ZeRO-3.

    Transformers reads the DeepSpeed config through a global weak reference; each model gets its
    own config here and the reference is cleared after, so a ZeRO-0 reference model loaded next
    is not partitioned by the actor's settings.
    """
    if ds_config.zero_stage(ds) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds)
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def _optimizer(params, lr: float, weight_decay: float, ds: dict[str, Any]):
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)  # one kernel per step


def _scheduler(optimizer, name: str, warmup: int, total: int):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _fetch_whole_blocks(model: torch.nn.Module) -> None:
    """ZeRO-3: gather each decoder block's parameters at once instead of hooking every submodule.

    DeepSpeed's per-submodule fetch/release hooks dominate the step for small and mid-size models;
    a block (the model's `_no_split_modules`) is the natural unit to fetch and still keeps only one
    block's weights materialised at a time.
    """
    from deepspeed.utils import set_z3_leaf_modules

    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    classes = list({type(m) for m in model.modules() if type(m).__name__ in names})
    if classes:
        set_z3_leaf_modules(model, classes)


def fused_fp32_clip(engine) -> None:
    """Make a ZeRO-0 fp32 engine clip its gradients with foreach kernels, in DeepSpeed's arithmetic.

    DeepSpeed's `clip_fp32_gradients` walks the parameters in Python: a norm and a multiply per
    gradient, plus an all-reduce of the total that averages MoE norms over data-parallel ranks (a no-op
    here: after the gradient all-reduce every rank holds the same gradients). On small models that
    Python is most of the optimizer step. The norms, the total and the coefficient below are
    DeepSpeed's operations in DeepSpeed's order, so the clipped gradients are bitwise the same
    (tests/test_ppo_stage.py).
    ZeRO 1-3 and fp16/bf16 engines clip inside DeepSpeed's own optimizers and are left alone.
    """
    max_norm = engine.gradient_clipping()

    def clip() -> None:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            return
        total = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum().pow(1.0 / 2.0)
        ones = torch.ones(1, device=total.device)
        coef = torch.min(ones, ones * float(max_norm) / (total + 1e-6))
        torch._foreach_mul_(grads, coef.squeeze())

    engine.clip_fp32_gradients = clip


def _engine(model, ds: dict[str, Any], lr: float | None = None, weight_decay: float = 0.0,
            scheduler: tuple[str, int, int] | None = None):
    import deepspeed

    # Not with frozen weights inside the blocks (a LoRA actor): the first block's input then carries
    # no gradient and DeepSpeed releases a leaf block's weights before its backward has used them.
    if ds_config.zero_stage(ds) == 3 and all(p.requires_grad for p in model.parameters()):
        _fetch_whole_blocks(model)

    if lr is None:  # frozen: forward only
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        return engine
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, lr, weight_decay, ds)
    lr_scheduler = _scheduler(optimizer, *scheduler) if scheduler else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds)
    if ds_config.zero_stage(ds) == 0 and deepspeed.comm.get_world_size() == 1:
        # An all-reduce over one rank averages nothing but still flattens and copies every gradient.
        engine.enable_backward_allreduce = False
    if ds_config.zero_stage(ds) == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        fused_fp32_clip(engine)
    return engine


@dataclass
class PPOModels:
    actor: Any  # DeepSpeedEngine over a causal LM (possibly a peft model)
    critic: Any | None  # DeepSpeedEngine over TokenValueModel; None for the critic-free estimators
    reference: Any | None  # DeepSpeedEngine over a causal LM; None when the actor's LoRA base serves
    reward: Any  # DeepSpeedEngine over TokenValueModel
    uses_lora: bool


def free_engines(models: PPOModels) -> None:
    """Tear the engines down so that their weights, gradients and optimizer states can be collected once the
    caller drops `models`. (Under ZeRO-3, deepspeed 0.19 keeps its engines' modules and optimizers alive after
    `destroy()`, measured on CPU: there this frees nothing yet.)"""
    for engine in (models.actor, models.critic, models.reference, models.reward):
        if hasattr(engine, "destroy"):  # not None, nor the value process's stand-in (that process has ended)
            engine.destroy()
    models.actor = models.critic = models.reference = models.reward = None


def deepspeed_configs(ctx: StageContext, total_updates: int) -> ds_config.PPODeepSpeed:
    return ds_config.ppo_configs(ctx.section, ctx.deepspeed, ctx.world_size, total_updates)


def build_policy_models(ctx: StageContext, tokenizer, total_updates: int) -> tuple[Any, Any | None]:
    """The actor's engine and the reference's (None with a LoRA actor: its base serves)."""
    cfg = ctx.section
    ds = deepspeed_configs(ctx, total_updates)
    with zero3_init(ds.actor):
        actor = load_model(ctx.input_path("actor"), what="ppo.input", trust_remote_code=ctx.trust_remote_code)
    check_model_tokenizer(actor, tokenizer, "ppo.input")
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        actor = get_peft_model(actor, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    actor.config.use_cache = False
    actor_engine = _engine(actor, ds.actor, cfg.lr, cfg.weight_decay, ds.scheduler)

    reference = None
    if cfg.lora is None:  # with LoRA, the reference is the actor's base with adapters disabled
        with zero3_init(ds.frozen):
            reference = _engine(load_model(ctx.input_path("actor"), what="ppo.input", trust_remote_code=ctx.trust_remote_code),
                                ds.frozen)
    return actor_engine, reference


def build_value_models(ctx: StageContext, tokenizer, total_updates: int) -> tuple[Any, Any]:
    """The critic's engine (None when the advantage estimator needs no critic) and the reward model's."""
    cfg = ctx.section
    ds = deepspeed_configs(ctx, total_updates)

    def value_model(key: str, what: str, fresh_head_ok: bool) -> TokenValueModel:
        # A critic may start from any checkpoint (a new one-output head is made if needed);
        # a reward model must already be a one-output classifier.
        kwargs = {"num_labels": 1, "ignore_mismatched_sizes": True} if fresh_head_ok else {}
        classifier = load_model(ctx.input_path(key), kind="seq_cls", what=what, trust_remote_code=ctx.trust_remote_code, **kwargs)
        if classifier.config.num_labels != 1:
            raise UserError(f"{what}: {ctx.input_path(key)} has {classifier.config.num_labels} outputs; "
                            "a reward model must have exactly one")
        classifier.config.pad_token_id = tokenizer.pad_token_id
        return TokenValueModel(classifier)

    critic_engine = None  # grpo, rloo, reinforce_pp: three models, no critic
    if cfg.uses_critic:
        with zero3_init(ds.critic):
            critic = value_model("critic", "ppo.critic", fresh_head_ok=True)
        critic_engine = _engine(critic, ds.critic, cfg.critic_lr, cfg.weight_decay, ds.scheduler)
    with zero3_init(ds.frozen):
        reward = _engine(value_model("reward_model", "ppo.reward_model", fresh_head_ok=False), ds.frozen)
    return critic_engine, reward


def build_models(ctx: StageContext, tokenizer, total_updates: int) -> PPOModels:
    """All four engines in this process."""
    actor, reference = build_policy_models(ctx, tokenizer, total_updates)
    critic, reward = build_value_models(ctx, tokenizer, total_updates)
    return PPOModels(actor, critic, reference, reward, ctx.section.lora is not None)
