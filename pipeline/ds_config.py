"""Resolve a stage's DeepSpeed config: preset or inline dict, with batch sizes filled from the stage.

Users pick `zero0`..`zero3` (or an offload preset) by name and never hand-match
`train_batch_size = micro * accum * world`: every "auto" is resolved here from the stage config.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(spec: str | dict[str, Any], key: str = "deepspeed.config") -> dict[str, Any]:
    """A preset name (configs/deepspeed/<name>.json), a JSON file path, or an inline dict."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    path = Path(spec)
    if path.suffix != ".json":
        path = PRESET_DIR / f"{spec}.json"
        if not path.exists():
            raise ConfigError(key, f"unknown preset '{spec}'; choices: {', '.join(preset_names())} or a .json path")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(key, f"DeepSpeed config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(key, f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def apply_precision(ds: dict[str, Any], precision: str) -> None:
    """Set `bf16.enabled` and `fp16.enabled`: both from `precision` unless it is `auto`; under `auto` the
    preset's own true/false stand and its "auto" means bf16 where supported (fp32 on CPU)."""
    bf16, fp16 = ds.setdefault("bf16", {}), ds.setdefault("fp16", {})
    if precision == "auto":
        if bf16.get("enabled", "auto") == "auto":
            bf16["enabled"] = bf16_supported() and fp16.get("enabled") is not True
        if fp16.get("enabled", False) == "auto":
            fp16["enabled"] = False
    else:
        bf16["enabled"], fp16["enabled"] = precision == "bf16", precision == "fp16"
    if not fp16:
        del ds["fp16"]


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def resolve(
    spec: str | dict[str, Any],
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float | None,
    key: str = "deepspeed.config",
    precision: str = "auto",
    machine_checks: bool = True,
) -> dict[str, Any]:
    """A complete DeepSpeed config dict with no "auto" left in the fields we own; `precision` (see
    DeepSpeedSection.precision) sets bf16/fp16, overriding the preset, unless it is `auto`.
    `machine_checks` refuses what this machine cannot run (check_nvme_offload); off for `rlhf plan`,
    which plans for another machine."""
    ds = load_preset(spec, key)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = micro_batch * grad_accum * world_size
    if ds.get("gradient_clipping", "auto") == "auto":
        if max_grad_norm is None:
            ds.pop("gradient_clipping", None)
        else:
            ds["gradient_clipping"] = max_grad_norm
    apply_precision(ds, precision)
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(key, f"zero_optimization.stage must be 0-3 (got {stage})")
    if machine_checks:
        check_nvme_offload(ds, key)
    return ds


def async_io_available() -> bool:
    """Whether DeepSpeed's async_io op (NVMe offload) is built or can be built here: it needs libaio."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    return builder is not None and bool(builder.is_compatible(verbose=False))


def check_nvme_offload(ds: dict[str, Any], key: str) -> None:
    """Refuse an NVMe offload this machine cannot do, before DeepSpeed starts: its `nvme_path` must be a
    directory here (DeepSpeed would otherwise create it wherever it points, on whatever disk that is), and
    the async_io op must be buildable (without libaio DeepSpeed fails deep inside engine setup)."""
    zero = ds.get("zero_optimization", {})
    nvme = [name for name in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(name), dict) and zero[name].get("device") == "nvme"]
    for name in nvme:
        path = zero[name].get("nvme_path")
        if not path or not Path(path).is_dir():
            raise ConfigError(key, f"zero_optimization.{name}.nvme_path {path!r} is not a directory on this machine; "
                                   "point it at a directory on the NVMe drive (inline dict or JSON copy of the "
                                   "preset), or offload to cpu (zero3_offload)")
    if nvme and not async_io_available():
        raise ConfigError(key, "NVMe offload needs DeepSpeed's async_io op, which cannot be built on this machine "
                               "(libaio and its headers are missing: install libaio-dev or libaio-devel); "
                               "or offload to cpu (zero3_offload)")


def inference_config(train_ds: dict[str, Any], micro_batch: int, world_size: int) -> dict[str, Any]:
    """Config for a frozen model: ZeRO-3 when the trained model is ZeRO-3 (so it shards too), else stage 0."""
    stage = 3 if zero_stage(train_ds) == 3 else 0
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        src = train_ds.get("zero_optimization", {})
        for k in ("stage3_param_persistence_threshold", "offload_param"):
            if k in src:
                zero[k] = copy.deepcopy(src[k])
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": train_ds.get("bf16", {}).get("enabled", False)},
        "fp16": {"enabled": train_ds.get("fp16", {}).get("enabled", False)},
        "steps_per_print": 1000000,
    }


def check_override_keys(base: dict[str, Any], override: dict[str, Any], key: str) -> None:
    """Refuse an override key that the config it overrides lacks but nearly has (`zero_optimisation`,
    `stgae`): DeepSpeed ignores a top-level key it does not know, so the typo would train silently with
    the preset's setting. Keys unlike any there pass: DeepSpeed has many more than a preset spells out."""
    import difflib

    for name, value in override.items():
        if name in base:
            if isinstance(value, dict) and isinstance(base[name], dict):
                check_override_keys(base[name], value, f"{key}.{name}")
            continue
        close = difflib.get_close_matches(name, list(base), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"{key}.{name}", f"not a key of the DeepSpeed config it overrides; did you mean "
                                               f"'{close[0]}'?")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, nested dicts key by key (`ppo.actor_deepspeed`, `ppo.critic_deepspeed`)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class PPODeepSpeed:
    actor: dict[str, Any]
    critic: dict[str, Any]
    frozen: dict[str, Any]  # reference and reward model: forward only
    scheduler: tuple[str, int, int]  # (name, warmup, total updates) for both trained engines


def ppo_configs(ppo, ds, world_size: int, total_updates: int = 0, machine_checks: bool = True) -> PPODeepSpeed:
    """The DeepSpeed configs of PPO's engines, from its section (`PPOSection`) and its merged deepspeed
    section: the actor and critic step once per minibatch split over the ranks; the frozen models follow the
    actor's ZeRO stage. One home for the PPO stage and `rlhf plan` (which passes `machine_checks=False`)."""
    def trained(overrides: dict[str, Any]) -> dict[str, Any]:
        resolved = resolve(ds.config, micro_batch=ppo.minibatch_size // world_size, grad_accum=1,
                           world_size=world_size, max_grad_norm=ppo.max_grad_norm, key="ppo.deepspeed.config",
                           precision=ds.precision, machine_checks=machine_checks)
        return merge(resolved, overrides)

    actor = trained(ppo.actor_deepspeed)
    frozen = inference_config(actor, ppo.rollout_batch_size // world_size, world_size)
    return PPODeepSpeed(actor, trained(ppo.critic_deepspeed), frozen, (ppo.lr_scheduler, ppo.warmup_steps, total_updates))
