"""`rlhf plan`: what each stage would launch and hold per rank, before any weight is loaded.

For every selected stage: the exact launcher command, the ranks, the batch sizes, and per engine
(PPO: actor, critic, reference, reward model) its ZeRO stage, offload, dtype and the per-rank
memory of parameters, gradients and optimizer state (pipeline.memory), from parameter counts of
the models' configs (pipeline.model_shapes). Nothing is loaded, written or launched.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import ds_config
from pipeline.config import LoraSection, PipelineConfig, load_config
from pipeline.launch import launcher_command
from pipeline.memory import GPU, EngineMemory, EngineSetup, engine_memory, engine_setup, format_bytes
from pipeline.model_shapes import CAUSAL_LM, SEQ_CLS, ModelSource, model_count, stage_source
from pipeline.rundir import RunDir

FREE_PORT = "<free-port>"  # chosen when the stage launches
EMA = "actor EMA"


@dataclass(frozen=True)
class EnginePlan:
    name: str
    origin: str  # where its shape came from
    params_total: int
    trainable_total: int
    setup: EngineSetup
    memory: EngineMemory


@dataclass(frozen=True)
class StagePlan:
    stage: str
    command: str
    num_gpus: int
    num_nodes: int
    batch: str
    engines: list[EnginePlan]
    notes: list[str]


def trained_stage_ds(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The DeepSpeed dict pretrain/SFT/reward train under (as pipeline.hf_training.deepspeed_dict)."""
    section, ds = cfg.stage(stage), cfg.stage_deepspeed(stage)
    return ds_config.resolve(ds.config, micro_batch=section.batch_size, grad_accum=section.grad_accum,
                             world_size=ds.world_size, max_grad_norm=section.max_grad_norm,
                             key=f"{stage}.deepspeed.config", precision=ds.precision, machine_checks=False)


def ppo_ds(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """The actor's, critic's and frozen models' DeepSpeed dicts: ds_config.ppo_configs, as the stage builds them."""
    ds = cfg.stage_deepspeed("ppo")
    configs = ds_config.ppo_configs(cfg.ppo, ds, ds.world_size, machine_checks=False)
    return {"actor": configs.actor, "critic": configs.critic, "frozen": configs.frozen}


@dataclass(frozen=True)
class EngineSpec:
    """One engine to plan: its model, how the stage builds it, and the DeepSpeed config it runs under."""

    name: str
    source: ModelSource
    kind: str  # CAUSAL_LM or SEQ_CLS (a one-output score head instead of the LM head)
    ds: dict[str, Any]
    trained: bool
    lora: LoraSection | None = None
    lora_key: str = ""  # the config key named when a LoRA target does not exist


def engine_plan(spec: EngineSpec, world: int, trust_remote_code: bool) -> EnginePlan:
    count = model_count(spec.source, spec.kind, spec.lora, spec.lora_key, trust_remote_code)
    setup = engine_setup(spec.ds, world)
    trainable = count.trainable_total if spec.trained else 0
    return EnginePlan(spec.name, spec.source.origin, count.params_total, trainable, setup,
                      engine_memory(count.params_total, trainable, setup, spec.trained))


def trained_stage_specs(cfg: PipelineConfig, stage: str, run_dir: RunDir) -> list[EngineSpec]:
    kind = SEQ_CLS if stage == "reward" else CAUSAL_LM
    return [EngineSpec("model", stage_source(cfg, stage, "input", run_dir), kind, trained_stage_ds(cfg, stage), True,
                       getattr(cfg.stage(stage), "lora", None), f"{stage}.lora")]


def ppo_specs(cfg: PipelineConfig, run_dir: RunDir) -> list[EngineSpec]:
    ds, actor = ppo_ds(cfg), stage_source(cfg, "ppo", "input", run_dir)
    specs = [EngineSpec("actor", actor, CAUSAL_LM, ds["actor"], True, cfg.ppo.lora, "ppo.lora")]
    if cfg.ppo.uses_critic:
        specs.append(EngineSpec("critic", stage_source(cfg, "ppo", "critic", run_dir), SEQ_CLS, ds["critic"], True))
    if cfg.ppo.lora is None:  # with LoRA the actor's base, adapters off, is the reference
        specs.append(EngineSpec("reference", actor, CAUSAL_LM, ds["frozen"], False))
    specs.append(EngineSpec("reward", stage_source(cfg, "ppo", "reward_model", run_dir), SEQ_CLS, ds["frozen"], False))
    return specs


def ema_plan(actor: EnginePlan) -> EnginePlan:
    """`ppo.ema_decay`: a whole copy of the actor's trainable weights on every rank (ZeRO 0-2 only)."""
    setup = EngineSetup(0, actor.setup.world_size, actor.setup.dtype, "none", "none")
    return EnginePlan(EMA, "copy of the actor's trainable weights", actor.trainable_total, 0, setup,
                      engine_memory(actor.trainable_total, 0, setup, trained=False))


def batch_line(cfg: PipelineConfig, stage: str) -> str:
    world = cfg.stage_deepspeed(stage).world_size
    s = cfg.stage(stage)
    if stage != "ppo":
        return (f"micro {s.batch_size}/rank x grad_accum {s.grad_accum} x {world} rank(s) = global "
                f"{s.batch_size * s.grad_accum * world} per optimizer step")
    samples = s.rollout_batch_size * s.samples_per_prompt
    return (f"rollout {s.rollout_batch_size} prompts/step x {s.samples_per_prompt} sample(s) "
            f"({samples // world} responses/rank, up to {s.max_new_tokens} tokens); minibatch {s.minibatch_size} "
            f"({s.minibatch_size // world}/rank), {samples // s.minibatch_size} update(s) x "
            f"{s.ppo_epochs} epoch(s) per step; {s.advantage_estimator} advantages")


def command_line(cfg: PipelineConfig, stage: str, run_dir: RunDir) -> str:
    ds = cfg.stage_deepspeed(stage)
    cmd = launcher_command(ds, run_dir.root, stage)
    if ds.master_port is None:
        cmd[cmd.index("--master_port") + 1] = FREE_PORT
    return " ".join(a if a == FREE_PORT else shlex.quote(a) for a in cmd)


def plan_stage(cfg: PipelineConfig, stage: str, run_dir: RunDir) -> StagePlan:
    ds = cfg.stage_deepspeed(stage)
    specs = ppo_specs(cfg, run_dir) if stage == "ppo" else trained_stage_specs(cfg, stage, run_dir)
    engines = [engine_plan(spec, ds.world_size, cfg.run.trust_remote_code) for spec in specs]
    notes = []
    if stage == "ppo" and cfg.ppo.ema_decay is not None:
        engines.append(ema_plan(engines[0]))
    if stage == "ppo" and cfg.ppo.lora is not None:
        notes.append("reference: the actor's base with adapters off (no fourth model)")
    return StagePlan(stage, command_line(cfg, stage, run_dir), ds.num_gpus, ds.num_nodes, batch_line(cfg, stage),
                     engines, notes)


def build_plan(config_path: str, overrides: list[str], stages: str | None,
               run_dir: str | None) -> tuple[PipelineConfig, RunDir, list[StagePlan]]:
    from pipeline.orchestrator import default_run_dir, select_stages

    cfg = load_config(config_path, overrides)
    rd = RunDir(Path(run_dir) if run_dir else default_run_dir(cfg))
    return cfg, rd, [plan_stage(cfg, stage, rd) for stage in select_stages(cfg, stages)]


# ---------------------------------------------------------------------------------------------------------------
# the printed plan

COLUMNS = ("engine", "parameters", "trainable", "ZeRO", "dtype", "offload", "params/rank", "grads/rank",
           "optimizer/rank", "GPU/rank")


def cell(share) -> str:
    if not share.bytes:
        return "-"
    return format_bytes(share.bytes) + ("" if share.device == GPU else f" ({share.device})")


def offload_text(setup: EngineSetup) -> str:
    parts = [f"{what}->{device}" for what, device in (("optimizer", setup.offload_optimizer),
                                                       ("params", setup.offload_param)) if device != "none"]
    return ", ".join(parts) or "-"


def engine_row(e: EnginePlan) -> list[str]:
    m = e.memory
    return [e.name, f"{e.params_total:,}", f"{e.trainable_total:,}" if e.trainable_total else "frozen",
            str(e.setup.zero_stage), e.setup.dtype, offload_text(e.setup), cell(m.params), cell(m.grads),
            cell(m.optimizer), format_bytes(m.on(GPU))]


def total_row(engines: list[EnginePlan]) -> list[str]:
    """The stage's sum per rank; off-GPU bytes are named by device in the kinds' columns."""
    def kind_total(kind: str) -> str:
        shares = [getattr(e.memory, kind) for e in engines]
        gpu = sum(s.bytes for s in shares if s.device == GPU)
        off = {d: sum(s.bytes for s in shares if s.device == d) for d in ("cpu", "nvme")}
        return " + ".join([format_bytes(gpu)] + [f"{format_bytes(b)} ({d})" for d, b in off.items() if b])

    gpu = sum(e.memory.on(GPU) for e in engines)
    models = sum(e.name != EMA for e in engines)
    label = f"total ({models} models{' + EMA' if models < len(engines) else ''})"
    return [label, f"{sum(e.params_total for e in engines):,}", "", "", "", "",
            kind_total("params"), kind_total("grads"), kind_total("optimizer"), format_bytes(gpu)]


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render_stage(p: StagePlan) -> list[str]:
    lines = [f"[{p.stage}] {p.num_gpus * p.num_nodes} rank(s): num_gpus {p.num_gpus} x num_nodes {p.num_nodes}",
             f"  command: {p.command}", f"  batch:   {p.batch}"]
    lines += [f"  {e.name}: {e.origin}" for e in p.engines]
    rows = [list(COLUMNS), *map(engine_row, p.engines)]
    if len(p.engines) > 1:
        rows.append(total_row(p.engines))
    return lines + table(rows) + [f"  note: {n}" for n in p.notes]


def precision_note(cfg: PipelineConfig, plans: list[StagePlan]) -> str | None:
    """Precision `auto` resolves on the machine that runs the ranks: say so when it came out fp32 here."""
    if ds_config.bf16_supported():
        return None
    auto = []
    for p in plans:
        ds = cfg.stage_deepspeed(p.stage)
        preset = ds_config.load_preset(ds.config)
        if ds.precision == "auto" and preset.get("bf16", {}).get("enabled", "auto") == "auto" \
                and preset.get("fp16", {}).get("enabled") is not True:
            auto.append(p.stage)
    if not auto:
        return None
    return (f"precision auto ({', '.join(auto)}): fp32 on this machine (no bf16 GPU), bf16 on GPUs that have it; "
            "add deepspeed.precision=bf16 to plan for those")


def render(config_path: str, run_dir: RunDir, cfg: PipelineConfig, plans: list[StagePlan]) -> str:
    lines = [f"plan for {config_path} (run dir {run_dir.root}): nothing loaded, written or launched"]
    note = precision_note(cfg, plans)
    lines += [note] if note else []
    for p in plans:
        lines += ["", *render_stage(p)]
    lines += ["", "per rank: parameters, gradients and Adam state (fp32 moments, and fp32 master weights where "
                  "DeepSpeed keeps them) only; activations, the generation KV cache and DeepSpeed buffers come on top"]
    return "\n".join(lines)
