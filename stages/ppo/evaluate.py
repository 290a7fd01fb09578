"""The end of the PPO stage: judge the new policy against the SFT policy it started from."""

from __future__ import annotations

from typing import Any

from pipeline.context import StageContext
from pipeline.evaluation.evaluate import (eval_settings, evaluate_policies, format_table, headline,
                                          load_fluency_model, load_prompts)


def evaluate_after_training(ctx: StageContext) -> dict[str, Any]:
    """Rank 0 samples from both policies on the held-out prompts with fixed seeds and judges them.

    Reads the just-saved actor from the staging dir, so it runs on plain models, not engines.
    """
    cfg = ctx.config
    if not cfg.eval.enabled or not ctx.is_main:
        return {}
    prompts = load_prompts(cfg, ctx.run_dir.data_dir)
    if not prompts:
        return {}
    sft = ctx.input_path("actor")
    results = evaluate_policies(
        {"sft": sft, "ppo": str(ctx.staging_final)}, reference=sft, prompts=prompts,
        settings=eval_settings(cfg, len(prompts)), fluency_lm=load_fluency_model(cfg, ctx.run_dir.data_dir),
        reward_model=ctx.input_path("reward_model"), device=ctx.device,
    )
    results["paths"] = {"sft": sft, "ppo": str(ctx.run_dir.final_dir("ppo"))}
    ctx.extra_manifest["evaluation"] = results
    print(format_table(results), flush=True)
    return headline(results)
