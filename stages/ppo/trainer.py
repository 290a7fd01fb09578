"""The PPO stage: our own loop over four DeepSpeed engines.

Each step, on every rank in lockstep (the same number of prompts, tokens and updates):
  1. rollout     sample responses for this rank's prompts (KV cache; ZeRO-3 gathers once)
  2. score       actor and reference log-probs, critic values, reward at the last token
  3. advantages  per-token KL penalty, shaped rewards, GAE, whitening
  4. update      `ppo_epochs` passes over minibatches: clipped policy and value losses
Then: metrics (averaged over ranks), the NaN/inf guard, samples for the tracker, periodic checkpoints.
At the end: the actor is saved as the hand-off checkpoint and judged against the SFT policy.

`train` is the loop; the parts it calls (resume, step metrics, logging, saving) follow it. The critic
and the reward model are reached through the value side (`values`, stages/ppo/value_process.py),
in this process or in a second one beside one CPU rank: the loop's calls are the same.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pipeline import ds_config, sharding
from pipeline.checkpoint import check_finite, resume_point
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
from stages.ppo.engines import PPOModels, build_models, build_policy_models, deepspeed_configs, free_engines
from stages.ppo.evaluate import evaluate_after_training
from stages.ppo.export import save_actor
from stages.ppo.update import update
from stages.ppo.value_process import InProcess, ValueProcess, ValueSide, value_sharding, wants_value_process


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


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


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


def release_memory(device: str) -> None:
    """Collect what was just dropped (engines hold reference cycles) and hand the accelerator's cache back."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def critic_eval_mode(models) -> None:
    if models.critic is not None:
        models.critic.eval()


def start_models(ctx: StageContext, tokenizer, total_updates: int) -> tuple[PPOModels, ValueSide]:
    """The four engines, with the critic and reward model in a value process where that pays."""
    ds = deepspeed_configs(ctx, total_updates)
    # a lone reward model is not worth a second process
    zero_stages = (ds_config.zero_stage(ds.actor), ds_config.zero_stage(ds.critic))
    if not ctx.section.uses_critic or not wants_value_process(ctx, zero_stages):
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


def sharding_report(models: PPOModels, values: ValueSide) -> dict[str, Any]:
    policy = sharding.report({"actor": models.actor, "reference": models.reference})
    value = values.call(value_sharding)
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

    @torch.no_grad()
    def load(self, saved: dict[str, torch.Tensor], path: Path) -> None:
        """Take the checkpoint's EMA, bit for bit, into this one's tensors (their device and dtype)."""
        if saved.keys() != self.shadow.keys():
            raise UserError(f"{path}: its EMA holds other weights than this actor's trainable ones "
                            f"({sorted(saved.keys() ^ self.shadow.keys())[:3]}...)")
        for name, value in saved.items():
            self.shadow[name].copy_(value)


@dataclass
class LoopState:
    """What the loop carries from step to step beside the engines; every checkpoint holds all of it."""

    kl_ctl: maths.KLController
    moments: xp.RunningMoments  # of the reward model's scores, for ppo.normalize_reward and center_reward
    ema: EMA | None

    @classmethod
    def fresh(cls, cfg, ema: EMA | None) -> "LoopState":
        kl_ctl = (maths.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                  else maths.FixedKLController(cfg.kl_coef))
        return cls(kl_ctl, xp.RunningMoments(), ema)


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
    models, values = start_models(ctx, tokenizer, total_updates=cfg.max_steps * updates_per_step)
    try:
        ema = EMA(models.actor.module, cfg.ema_decay) if cfg.ema_decay else None
        metrics = train(ctx, models, values, tokenizer, prompts, prompt_ids, ema)
        sharding_info = sharding_report(models, values)
    finally:
        values.close()
    save_actor(models, tokenizer, ctx, ema)
    barrier()
    result = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("ppo/")}
    result["steps"] = cfg.max_steps
    result["sharding"] = sharding_info
    result["peak_memory_mib"] = peak_memory_mib(ctx.device)
    # The evaluation loads plain models of its own on rank 0: the engines (weights, gradients, optimizer
    # states) go first, or a policy that trained sharded over GPUs meets all of that again on one.
    free_engines(models)
    del models, values, ema
    release_memory(ctx.device)
    result.update(evaluate_after_training(ctx))
    return result


def train(ctx: StageContext, models: PPOModels, values: ValueSide, tokenizer, prompts: list[Prompt],
          prompt_ids: list[list[int]], ema: EMA | None) -> dict[str, float]:
    """Resume from the newest checkpoint if any, then run the PPO steps; returns the last step's metrics."""
    cfg = ctx.section
    loop = LoopState.fresh(cfg, ema)
    engines = {name: e for name, e in (("actor", models.actor), ("critic", models.critic)) if e is not None}
    start_step = resume(ctx, engines, loop)

    models.actor.eval()  # no dropout: the log-probs and values of the update must match the scoring's
    values.call(critic_eval_mode)
    metrics: dict[str, float] = {}
    for step in range(start_step, cfg.max_steps):
        clock = PhaseClock(torch.device(ctx.device))
        generator = sampling_generator(ctx, step)
        with clock("rollout"):  # 1.
            rows = row_prompts(ctx, step, len(prompts))
            r = xp.rollout(models.actor, *left_pad([prompt_ids[i] for i in rows], tokenizer.pad_token_id, ctx.device),
                           cfg, tokenizer, generator)
        with clock("score"):  # 2.
            scores = xp.score(models, values, r, cfg.temperature, with_actor=not cfg.old_logprobs_from_update)
        with clock("advantages"):  # 3.
            shaped = xp.shape_scores(scores.raw_scores, r, cfg, loop.moments, all_gather_cat)
            adv = xp.advantages(scores, shaped, r, cfg, loop.kl_ctl.value,
                                sum_over_ranks if ctx.world_size > 1 else None)  # whiten over the whole batch
        with clock("update"):  # 4.
            exp = xp.Experience(rollout=r, scores=scores, advantages=adv)
            stats = update(models, values, exp, cfg, cfg.minibatch_size // ctx.world_size, generator, loop.kl_ctl.value)
            if loop.ema is not None:
                loop.ema.update(models.actor.module)

        metrics = step_metrics(stats, r, scores, adv, loop.kl_ctl.value, clock.seconds, ctx.device)
        check_finite("ppo", {k: metrics.get(k) for k in FINITE_FIRST}, step + 1, ctx.output_dir)
        loop.kl_ctl.update(metrics["ppo/kl_to_ref"], cfg.rollout_batch_size * cfg.samples_per_prompt)
        log_step(ctx, step, start_step, metrics)
        log_samples(ctx, step, tokenizer, prompts, rows, r, scores.raw_scores)
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(ctx, step + 1, engines, loop)
    return metrics


# ---- the loop's parts -------------------------------------------------------------------------------------------


def resume(ctx: StageContext, engines: dict[str, Any], loop: LoopState) -> int:
    """The resume decision: `--from`, else the newest complete checkpoint, else none. Restores the
    engines, RNG and `loop` from it; returns the step to start from."""
    path = resume_point(ctx.resume_from, ctx.output_dir)
    if path is None:
        return 0
    saved = ckpt.load(path, engines, ctx.rank, ctx.world_size, ctx.config_hash, semantic_stage_config(ctx.config, "ppo"),
                      ctx.force_resume)
    loop.kl_ctl.load_state_dict(saved["kl_controller"])
    loop.moments.load_state_dict(saved["reward_moments"])
    ema = ckpt.load_tensors(path, "ema")
    if loop.ema is not None and ema is not None:
        loop.ema.load(ema, path)
    if ctx.is_main:
        print(f"[ppo] resumed from {path} at step {saved['step']}", flush=True)
    return saved["step"]


def save_checkpoint(ctx: StageContext, step: int, engines: dict[str, Any], loop: LoopState) -> None:
    ckpt.save(ctx.output_dir, step, engines, {
        "step": step, "world_size": ctx.world_size, "config_hash": ctx.config_hash,
        "stage_config": semantic_stage_config(ctx.config, "ppo"),
        "kl_controller": loop.kl_ctl.state_dict(), "reward_moments": loop.moments.state_dict(),
        "wandb_run_id": ctx.tracker.run_id,
    }, ctx.rank, ctx.section.keep_checkpoints, barrier, tensors={"ema": loop.ema.shadow} if loop.ema else None)


def sampling_generator(ctx: StageContext, step: int) -> torch.Generator:
    """This rank's sampling and minibatch-shuffling randomness at `step` (resumable by step)."""
    cfg = ctx.section
    seed = cfg.sampling_seed if cfg.sampling_seed is not None else ctx.config.run.seed
    return torch.Generator(device=torch.device(ctx.device)).manual_seed(seed * 1_000_003 + step * 1009 + ctx.rank)


def row_prompts(ctx: StageContext, step: int, n_prompts: int) -> list[int]:
    """The prompt of each rollout row: each prompt `samples_per_prompt` times in a row, a group on this rank."""
    cfg = ctx.section
    return [i for i in prompt_indices(step, n_prompts, cfg.rollout_batch_size, ctx.rank, ctx.world_size,
                                      ctx.config.run.seed) for _ in range(cfg.samples_per_prompt)]


class PhaseClock:
    """Wall-clock seconds of each phase of a step, the accelerator synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[phase] = time.perf_counter() - t0


def step_metrics(train_stats: dict[str, float], r: xp.Rollout, scores: xp.Scores, adv: xp.Advantages,
                 kl_coef: float, seconds: dict[str, float], device: str) -> dict[str, float]:
    """The step's logged numbers: every rank contributes, every rank gets the mean over ranks."""
    seq_kl = maths.masked_sum(scores.logprobs - scores.ref_logprobs, r.mask, dim=1)
    new_tokens = float(r.mask.sum())
    stats = {
        **{f"ppo/{k}": v for k, v in train_stats.items()},
        "ppo/reward_mean": float(scores.raw_scores.mean()),
        "ppo/reward_std": float(all_gather_cat(scores.raw_scores).std()),
        "ppo/kl_to_ref": float(seq_kl.mean()), "ppo/kl_coef": kl_coef,
        # per response, by ppo.kl_estimator (kl_to_ref is k1's): the KL the reward's penalty uses (kl_in: loss uses k3)
        "ppo/kl_estimate": float(maths.masked_sum(adv.kl, r.mask, dim=1).mean()),
        "ppo/response_length": float(r.mask.sum(-1).mean()), "ppo/eos_fraction": float(r.ended.float().mean()),
        "ppo/advantage_mean": float(maths.masked_mean(adv.advantages, r.mask)),
        **{f"time/{k}_s": v for k, v in seconds.items()},
        # each phase's throughput in this rank's response tokens, so the phases compare directly
        **{f"time/{k}_tokens_per_s": new_tokens / max(seconds[k], 1e-9) for k in ("rollout", "score", "update")},
        "time/step_s": sum(seconds.values()),
    }
    return mean_over_ranks(stats, torch.device(device))


# checked for NaN/inf after every step, the cause before its effects
FINITE_FIRST = ("ppo/reward_mean", "ppo/policy_loss", "ppo/value_loss")


def log_step(ctx: StageContext, step: int, start_step: int, metrics: dict[str, float]) -> None:
    ctx.tracker.log(metrics, step=step + 1)
    if ctx.is_main and ((step + 1) % ctx.section.logging_steps == 0 or step == start_step):
        print(f"[ppo] step {step + 1}/{ctx.section.max_steps} reward {metrics['ppo/reward_mean']:+.3f} "
              f"kl {metrics['ppo/kl_to_ref']:.3f} len {metrics['ppo/response_length']:.1f} "
              f"{metrics['time/step_s']:.2f}s/step", flush=True)


def log_samples(ctx: StageContext, step: int, tokenizer, prompts: list[Prompt], rows: list[int], r: xp.Rollout,
                raw_scores: torch.Tensor) -> None:
    """Every `tracking.sample_every` steps, this rank's prompts, responses and rewards as a table (rank 0)."""
    if ctx.is_main and (step + 1) % ctx.config.tracking.sample_every == 0:
        texts = tokenizer.batch_decode(r.responses, skip_special_tokens=True)
        table = [[prompt_text(prompts[i]), t, float(s)] for i, t, s in zip(rows, texts, raw_scores)]
        ctx.tracker.log_table("ppo/samples", ["prompt", "response", "reward"], table, step=step + 1)
