"""PPO checkpoints: both trained engines, the loop state and every RNG, written atomically.

    checkpoint-N/
      actor/, critic/       DeepSpeed checkpoints (weights, optimizer, scheduler, ZeRO shards)
      rng_rank{r}.json      python, numpy and torch RNG state of rank r
      ema.safetensors       the EMA of the actor's trainable weights (with ppo.ema_decay)
      rlhf_complete.json    step, KL controller, reward statistics, tracker id, config: the marker,
                            written by rank 0 once every rank finished (pipeline.checkpoint's protocol)

A crash mid-save leaves checkpoint-N without its marker, so the previous checkpoint stays the newest
complete one. (Checkpoints from before that protocol hold the same state as ppo_state.json.)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import check_resumable, fault_point, open_checkpoint, read_json, seal_checkpoint, write_json
from pipeline.errors import UserError


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(stage_dir: Path, step: int, engines: dict[str, Any], state: dict[str, Any], rank: int,
         keep: int, barrier, tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint-`step` on every rank under the one protocol of `pipeline.checkpoint`; `state` (the
    loop state, with what `check_resumable` reads) becomes its marker, written last by rank 0.

    `tensors` (the same on every rank): named sets of tensors that rank 0 writes as `<name>.safetensors`.
    """
    path = stage_dir / f"checkpoint-{step}"
    open_checkpoint(path, rank == 0, barrier)
    for name, engine in engines.items():
        engine.save_checkpoint(str(path / name), tag="state")
        fault_point("ppo", step, "writing")  # tests only: the actor written, the critic not
    write_json(path / f"rng_rank{rank}.json", rng_state())
    if rank == 0:
        for name, named in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(path / f"{name}.safetensors"))
    seal_checkpoint(path, state, rank == 0, barrier, keep)
    fault_point("ppo", step, "saved")
    return path


def load(path: Path, engines: dict[str, Any], rank: int, world_size: int, config_hash: str,
         stage_config: dict[str, Any], force: bool) -> dict[str, Any]:
    """Restore engines, RNG and loop state from `path`; refuse a checkpoint that means something else."""
    state = check_resumable(path, "ppo", config_hash, stage_config, world_size, force)
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(path / name), tag="state")
        if load_path is None:
            raise UserError(f"{path / name}: DeepSpeed checkpoint could not be loaded")
    rng = read_json(path / f"rng_rank{rank}.json")
    if rng is not None:
        set_rng_state(rng)
    return state


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The tensors `save` wrote as `<name>.safetensors` in checkpoint `path` (None if it has none)."""
    file = path / f"{name}.safetensors"
    return load_file(str(file)) if file.exists() else None
