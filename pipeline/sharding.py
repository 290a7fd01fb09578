"""How much of each model every rank really holds under DeepSpeed ZeRO, measured from the engines.

Per engine and rank:
  params_local       parameter elements stored on this rank: under ZeRO-3 its partition of each
                     parameter (`ds_tensor`), otherwise the whole parameter
  optim_state_local  elements of the tensors the optimizer keeps on this rank apart from the model's
                     own weights: Adam's two moments and, where DeepSpeed keeps one, the fp32 master
                     partition (ZeRO-1/2 always; ZeRO-3 only when it is not the weights themselves,
                     which it is in fp32). The optimizer's scalar step counters are left out.
Every rank measures its own engines; the numbers are gathered so rank 0 can write them into the
stage's manifest (`metrics.sharding`). Call on every rank, after at least one optimizer step (plain
torch optimizers, ZeRO stage 0, create their state lazily on the first step).
"""

from __future__ import annotations

from typing import Any


def _storage(t) -> int:
    return t.untyped_storage().data_ptr()


def _optimizer_tensors(optimizer) -> list:
    """The fp32 master partitions of a ZeRO optimizer and the state tensors of the torch optimizer inside."""
    import torch

    if optimizer is None:
        return []
    tensors = [*getattr(optimizer, "single_partition_of_fp32_groups", []),  # ZeRO-1/2
               *getattr(optimizer, "fp32_partitioned_groups_flat", [])]  # ZeRO-3
    inner = getattr(optimizer, "optimizer", None)  # ZeRO wraps the torch optimizer; stage 0 uses it as is
    torch_optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    for state in getattr(torch_optimizer, "state", {}).values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return tensors


def local_sizes(engine) -> dict[str, int]:
    """This rank's parameter and optimizer-state element counts for one DeepSpeed engine."""
    params = list(engine.module.parameters())
    held = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]  # ZeRO-3: this rank's partition
    weights = {_storage(t) for t in held if t.numel()}
    seen, optim = set(), 0
    for t in _optimizer_tensors(engine.optimizer):
        key = (_storage(t), t.storage_offset(), t.numel())
        if t.numel() and key not in seen and key[0] not in weights:
            seen.add(key)
            optim += t.numel()
    return {
        "params_local": sum(t.numel() for t in held),
        "params_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "trainable_total": sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad),
        "optim_state_local": optim,
    }


def report(engines: dict[str, Any]) -> dict[str, Any]:
    """`{world_size, engines: {name: {zero_stage, params_total, trainable_total, per_rank: [...]}}}` on every rank."""
    import torch.distributed as dist

    mine = {name: local_sizes(engine) for name, engine in engines.items() if engine is not None}
    if dist.is_initialized() and dist.get_world_size() > 1:
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    out: dict[str, Any] = {"world_size": len(ranks), "engines": {}}
    for name in mine:
        first = ranks[0][name]
        out["engines"][name] = {
            "zero_stage": int(engines[name].zero_optimization_stage()),
            "params_total": first["params_total"],
            "trainable_total": first["trainable_total"],
            "per_rank": [{k: r[name][k] for k in ("params_local", "optim_state_local")} for r in ranks],
        }
    return out


def describe(sharding: dict[str, Any]) -> str:
    """One line for `rlhf status`: per engine, ZeRO stage and rank 0's share of params and optimizer state."""
    parts = []
    for name, e in sharding.get("engines", {}).items():
        rank0 = e["per_rank"][0]
        share = rank0["params_local"] / max(e["params_total"], 1)
        parts.append(f"{name} ZeRO-{e['zero_stage']} params/rank {rank0['params_local']:,} ({share:.0%}) "
                     f"optimizer state/rank {rank0['optim_state_local']:,}")
    return f"{sharding.get('world_size', 1)} rank(s): " + "; ".join(parts)
