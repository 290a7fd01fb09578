"""The PPO stage: our own loop over four DeepSpeed engines.

Each step, on every rank in lockstep (the same number of prompts, tokens and updates):
  1. rollout     sample responses for this rank's prompts (KV cache; ZeRO-3 gathers once)
  2. score       actor and reference log-probs, critic values, reward at the last token
  3. advantages  per-token KL penalty, shaped rewards, GAE, whitening
  4. update      `ppo_epochs` passes over minibatches: clipped policy and value losses
Then: metrics (averaged over ranks), samples for the tracker, periodic checkpoints.
At the end: the actor is saved as the hand-off checkpoint and judged against the SFT policy.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pipeline import ds_config, sharding
from pipeline.context import StageContext
from pipeline.data import load_stage_rows
from pipeline.errors import UserError
from pipeline.generation import encode_prompts, left_pad
from pipeline.schemas import Prompt, prompt_text
from pipeline.models import load_tokenizer
from pipeline.rundir import semantic_stage_config
from pipeline.worker import barrier
from stages.ppo import experience as xp
from stages.ppo import maths, state as ckpt
from stages.ppo.engines import PPOModels, build_models, build_policy_models, deepspeed_configs
from stages.ppo.evaluate import evaluate_after_training
from stages.ppo.export import save_actor
from stages.ppo.update import update
from stages.ppo.value_process import InProcess, ValueProcess, value_sharding, wants_value_process


@functools.lru_cache(maxsize=4)
def epoch_order(n_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_prompts))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return tuple(order)


def prompt_indices(step: int, n_prompts: int, global_batch: int, rank: int, world: int, seed: int) -> list[int]:
    """The prompts rank `rank` uses at `step`: a slice of a seeded per-epoch shuffle (resumable by step)."""
    local = global_batch // world
    start = step * global_batch + rank * local
    return [epoch_order(n_prompts, seed, i // n_prompts)[i % n_prompts] for i in range(start, start + local)]


def mean_over_ranks(stats: dict[str, float], device) -> dict[str, float]:
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device: str) -> float:
    """This rank's peak memory so far: the accelerator's allocated peak, or on CPU the process's peak
    resident set (a value process's own memory is not included)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def critic_eval_mode(models) -> None:
    if models.critic is not None:
        models.critic.eval()


@contextlib.contextmanager
def cores_split(value_runner) -> Iterator[None]:
    """While the value process works beside this one, this one uses half of the intra-op threads."""
    threads = torch.get_num_threads()
    if isinstance(value_runner, ValueProcess):
        torch.set_num_threads(max(1, threads // 2))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def start_models(ctx: StageContext, tokenizer, total_updates: int) -> tuple[PPOModels, InProcess | ValueProcess]:
    """The four engines, with the critic and reward model in a value process where that pays."""
    ds = deepspeed_configs(ctx, total_updates)
    # a lone reward model is not worth a second process
    if not ctx.section.uses_critic or not wants_value_process(ctx, (ds_config.zero_stage(ds.actor), ds_config.zero_stage(ds.critic))):
        models = build_models(ctx, tokenizer, total_updates)
        return models, InProcess(models)
    values = ValueProcess(ctx, tokenizer, total_updates, threads=max(1, torch.get_num_threads() // 2))
    try:
        actor, reference = build_policy_models(ctx, tokenizer, total_updates)
        values.result(1)  # the critic and reward model are built; their errors are raised here
    except BaseException:
        values.close()
        raise
    return PPOModels(actor, values.critic, reference, None, ctx.section.lora is not None), values


def sharding_report(models: PPOModels, value_runner) -> dict[str, Any]:
    policy = sharding.report({"actor": models.actor, "reference": models.reference})
    value = value_runner.submit(value_sharding).result()
    engines = {**policy["engines"], **value["engines"]}
    return {**policy, "engines": {k: engines[k] for k in ("actor", "critic", "reference", "reward") if k in engines}}


class EMA:
    """Exponential moving average of the actor's trainable weights (ZeRO 0-2: full tensors per rank)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.section
    # the actor's own stage: a preset, an inline dict or file, or ppo.actor_deepspeed may make it ZeRO-3
    if cfg.ema_decay is not None and ds_config.zero_stage(deepspeed_configs(ctx, 0).actor) == 3:
        raise UserError("ppo.ema_decay: EMA is supported with ZeRO stages 0-2 (the actor is sharded under ZeRO-3)")

    tokenizer = load_tokenizer(ctx.input_path("actor"), what="ppo.input", trust_remote_code=ctx.trust_remote_code)
    tokenizer.padding_side = "left"
    data = load_stage_rows(cfg.data, "ppo", split="train", data_dir=ctx.run_dir.data_dir, what="ppo")
    prompts = list(data.rows["prompt"])
    full_ids = encode_prompts(tokenizer, prompts, max_len=None)
    too_long = sum(len(ids) > cfg.max_prompt_length for ids in full_ids)
    if too_long and ctx.is_main:
        print(f"[ppo] warning: {too_long} of {len(prompts)} prompts are longer than ppo.max_prompt_length "
              f"({cfg.max_prompt_length} tokens with the chat template); they keep their last "
              f"{cfg.max_prompt_length} tokens", flush=True)
    prompt_ids = [ids[-cfg.max_prompt_length:] for ids in full_ids]
    ctx.extra_manifest["prompt_example"] = tokenizer.decode(prompt_ids[0])  # what the policy is given, template and all
    updates_per_step = cfg.ppo_epochs * (cfg.rollout_batch_size * cfg.samples_per_prompt // cfg.minibatch_size)
    models, value_runner = start_models(ctx, tokenizer, total_updates=cfg.max_steps * updates_per_step)
    try:
        ema = EMA(models.actor.module, cfg.ema_decay) if cfg.ema_decay else None
        metrics = train(ctx, models, value_runner, tokenizer, prompts, prompt_ids, ema)
        sharding_info = sharding_report(models, value_runner)
    finally:
        value_runner.close()
    save_actor(models, tokenizer, ctx, ema)
    barrier()
    result = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("ppo/")}
    result["steps"] = cfg.max_steps
    result["sharding"] = sharding_info
    result["peak_memory_mib"] = peak_memory_mib(ctx.device)
    result.update(evaluate_after_training(ctx))
    return result


def train(ctx: StageContext, models: PPOModels, value_runner, tokenizer, prompts: list[Prompt],
          prompt_ids: list[list[int]], ema: EMA | None) -> dict[str, float]:
    """Resume from the newest checkpoint if any, then run the PPO steps; returns the last step's metrics."""
    cfg = ctx.section
    device = torch.device(ctx.device)
    world, rank = ctx.world_size, ctx.rank
    kl_ctl = (maths.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else maths.FixedKLController(cfg.kl_coef))
    moments = xp.RunningMoments()
    engines = {name: e for name, e in (("actor", models.actor), ("critic", models.critic)) if e is not None}
    stage_config = semantic_stage_config(ctx.config, "ppo")
    sampling_seed = cfg.sampling_seed if cfg.sampling_seed is not None else ctx.config.run.seed

    start_step = 0
    resume = ctx.resume_from or next(iter(ckpt.complete_checkpoints(ctx.output_dir)[-1:]), None)
    if resume is not None:
        saved = ckpt.load(resume, engines, rank, world, None if ctx.force_resume else ctx.config_hash, stage_config)
        start_step = saved["step"]
        kl_ctl.load_state_dict(saved["kl_controller"])
        moments.load_state_dict(saved["reward_moments"])
        if ema is not None and saved.get("ema") is not None:
            ema.shadow = {k: torch.tensor(v) for k, v in saved["ema"].items()}
        if ctx.is_main:
            print(f"[ppo] resumed from {resume} at step {start_step}", flush=True)

    local_minibatch = cfg.minibatch_size // world
    models.actor.eval()  # no dropout: the log-probs and values of the update must match the scoring's
    value_runner.submit(critic_eval_mode).result()
    metrics: dict[str, float] = {}
    for step in range(start_step, cfg.max_steps):
        timings: dict[str, float] = {}
        generator = torch.Generator(device=device).manual_seed(sampling_seed * 1_000_003 + step * 1009 + rank)

        # 1. rollout
        sync(device)
        t0 = time.perf_counter()
        # the prompt of each rollout row: each prompt `samples_per_prompt` times in a row, a group on this rank
        row_prompt = [i for i in prompt_indices(step, len(prompts), cfg.rollout_batch_size, rank, world,
                                                ctx.config.run.seed) for _ in range(cfg.samples_per_prompt)]
        ids, mask = left_pad([prompt_ids[i] for i in row_prompt], tokenizer.pad_token_id, device)
        r = xp.rollout(models.actor, ids, mask, cfg, tokenizer, generator)
        sync(device)
        timings["rollout"] = time.perf_counter() - t0

        # 2. score
        t0 = time.perf_counter()
        with cores_split(value_runner):
            logprobs, ref_logprobs, values, raw_scores = xp.score(models, r, cfg.temperature, value_runner)
        sync(device)
        timings["score"] = time.perf_counter() - t0

        # 3. advantages
        t0 = time.perf_counter()
        scores = xp.shape_scores(raw_scores, r, cfg, moments, all_gather_cat)
        kl, rewards, adv, returns = xp.advantages(logprobs, ref_logprobs, values, scores, r, cfg, kl_ctl.value)
        exp = xp.Experience(r, logprobs, ref_logprobs, values, raw_scores, scores, kl, rewards, adv, returns)
        timings["advantages"] = time.perf_counter() - t0

        # 4. update
        t0 = time.perf_counter()
        with cores_split(value_runner):
            train_stats = update(models, exp, cfg, local_minibatch, generator, value_runner, kl_ctl.value)
        if ema is not None:
            ema.update(models.actor.module)
        sync(device)
        timings["update"] = time.perf_counter() - t0

        # metrics: every rank contributes, every rank agrees
        seq_kl = maths.masked_sum(logprobs - ref_logprobs, r.mask, dim=1)
        new_tokens = float(r.mask.sum())
        step_stats = {
            **{f"ppo/{k}": v for k, v in train_stats.items()},
            "ppo/reward_mean": float(raw_scores.mean()), "ppo/reward_std": float(all_gather_cat(raw_scores).std()),
            "ppo/kl_to_ref": float(seq_kl.mean()), "ppo/kl_coef": kl_ctl.value,
            # per response, by ppo.kl_estimator (kl_to_ref is k1's): the KL the penalty uses
            "ppo/kl_estimate": float(maths.masked_sum(kl, r.mask, dim=1).mean()),
            "ppo/response_length": float(r.mask.sum(-1).mean()), "ppo/eos_fraction": float(r.ended.float().mean()),
            "ppo/advantage_mean": float(maths.masked_mean(adv, r.mask)),
            **{f"time/{k}_s": v for k, v in timings.items()},
            # each phase's throughput in this rank's response tokens, so the phases compare directly
            **{f"time/{k}_tokens_per_s": new_tokens / max(timings[k], 1e-9) for k in ("rollout", "score", "update")},
            "time/step_s": sum(timings.values()),
        }
        step_stats = mean_over_ranks(step_stats, device)
        for key in ("ppo/reward_mean", "ppo/policy_loss", "ppo/value_loss"):  # the cause before its effects
            if key in step_stats and not torch.isfinite(torch.tensor(step_stats[key])):
                last = ckpt.complete_checkpoints(ctx.output_dir)
                raise UserError(f"ppo: {key} is not finite at step {step + 1}; last good checkpoint: "
                                f"{last[-1] if last else 'none (nothing saved yet)'}")
        kl_ctl.update(step_stats["ppo/kl_to_ref"], cfg.rollout_batch_size * cfg.samples_per_prompt)
        metrics = step_stats
        ctx.tracker.log(step_stats, step=step + 1)
        if ctx.is_main and ((step + 1) % cfg.logging_steps == 0 or step == start_step):
            print(f"[ppo] step {step + 1}/{cfg.max_steps} reward {step_stats['ppo/reward_mean']:+.3f} "
                  f"kl {step_stats['ppo/kl_to_ref']:.3f} len {step_stats['ppo/response_length']:.1f} "
                  f"{step_stats['time/step_s']:.2f}s/step", flush=True)
        if ctx.is_main and (step + 1) % ctx.config.tracking.sample_every == 0:
            texts = tokenizer.batch_decode(r.responses, skip_special_tokens=True)
            table = [[prompt_text(prompts[i]), t, float(s)] for i, t, s in zip(row_prompt, texts, raw_scores)]
            ctx.tracker.log_table("ppo/samples", ["prompt", "response", "reward"], table, step=step + 1)

        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            ckpt.save(ctx.output_dir, step + 1, engines, {
                "step": step + 1, "world_size": world, "config_hash": ctx.config_hash, "stage_config": stage_config,
                "kl_controller": kl_ctl.state_dict(), "reward_moments": moments.state_dict(),
                "wandb_run_id": ctx.tracker.run_id,
                "ema": {k: v.tolist() for k, v in ema.shadow.items()} if ema else None,
            }, rank, cfg.keep_checkpoints, barrier)

    return metrics
