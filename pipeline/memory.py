"""What one rank holds for one DeepSpeed engine, estimated from parameter counts before anything loads.

Three kinds of tensors, per rank:
  parameters  the model's weights in the training dtype (2 bytes under bf16/fp16, else 4);
              ZeRO-3 splits them across the ranks, `offload_param` moves that share to cpu/nvme
  gradients   one per trainable parameter, in the training dtype; ZeRO-2 and 3 split them
  optimizer   Adam's two fp32 moments per trainable parameter, plus an fp32 master copy of the
              trainable weights wherever DeepSpeed keeps one apart from the model's own: always under
              ZeRO 1-3 (its partitioned optimizer owns an fp32 partition, also when training in fp32;
              pipeline/sharding.py measures exactly that: 3 x trainable at one rank), and under ZeRO-0
              only in bf16/fp16. ZeRO 1-3 split it; `offload_optimizer` moves it (and, under ZeRO 2-3,
              the gradient partition, kept there in fp32) to cpu/nvme.
Frozen engines (PPO's reference and reward model) hold parameters only.

Not counted: activations, the KV cache of generation, DeepSpeed's communication buckets, the
temporary fp32 gradients of a bf16 step, and the few small parameters ZeRO-3 keeps whole on every
rank below `stage3_param_persistence_threshold` (a whole norm weight per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FP32 = 4
ADAM_MOMENTS = 2
GPU = "gpu"  # the rank's own device: a GPU, or host memory for a CPU rank


@dataclass(frozen=True)
class EngineSetup:
    """The parts of a resolved DeepSpeed config that decide what one rank holds."""

    zero_stage: int
    world_size: int
    dtype: str  # "bf16", "fp16" or "fp32"
    offload_optimizer: str  # "none", "cpu" or "nvme"; only used under ZeRO 1-3
    offload_param: str  # "none", "cpu" or "nvme"; only used under ZeRO-3

    @property
    def dtype_bytes(self) -> int:
        return FP32 if self.dtype == "fp32" else 2


@dataclass(frozen=True)
class Share:
    """One kind of tensor on one rank."""

    elements: int
    bytes: int
    device: str  # GPU, "cpu" or "nvme"


@dataclass(frozen=True)
class EngineMemory:
    """What one rank holds for one engine."""

    params: Share
    grads: Share
    optimizer: Share

    def on(self, device: str) -> int:
        return sum(s.bytes for s in (self.params, self.grads, self.optimizer) if s.device == device)


def training_dtype(ds: dict[str, Any]) -> str:
    """"bf16", "fp16" or "fp32" from a resolved DeepSpeed config (no "auto" left)."""
    if ds.get("bf16", {}).get("enabled") is True:
        return "bf16"
    if ds.get("fp16", {}).get("enabled") is True:
        return "fp16"
    return "fp32"


def offload_device(zero: dict[str, Any], key: str) -> str:
    device = (zero.get(key) or {}).get("device") or "none"
    return device if device in ("cpu", "nvme") else "none"


def engine_setup(ds: dict[str, Any], world_size: int) -> EngineSetup:
    """Read zero stage, dtype and offload from a resolved DeepSpeed config."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    return EngineSetup(
        zero_stage=stage,
        world_size=world_size,
        dtype=training_dtype(ds),
        offload_optimizer=offload_device(zero, "offload_optimizer") if stage >= 1 else "none",
        offload_param=offload_device(zero, "offload_param") if stage == 3 else "none",
    )


def split(elements: int, world_size: int, partitioned: bool) -> int:
    """One rank's share: a ceiling, since ZeRO pads partitions to divide evenly."""
    return -(-elements // world_size) if partitioned else elements


def master_copy(setup: EngineSetup) -> bool:
    """Whether the optimizer keeps fp32 weights of its own (see the module docstring)."""
    return setup.zero_stage >= 1 or setup.dtype != "fp32"


def optimizer_copies(setup: EngineSetup) -> int:
    """fp32 tensors the optimizer keeps per trainable parameter: 2 Adam moments (+1 master copy)."""
    return ADAM_MOMENTS + int(master_copy(setup))


def param_share(params_total: int, setup: EngineSetup) -> Share:
    elements = split(params_total, setup.world_size, setup.zero_stage == 3)
    device = setup.offload_param if setup.offload_param != "none" else GPU
    return Share(elements, elements * setup.dtype_bytes, device)


def grad_share(trainable: int, setup: EngineSetup) -> Share:
    elements = split(trainable, setup.world_size, setup.zero_stage >= 2)
    if setup.zero_stage >= 2 and setup.offload_optimizer != "none":
        return Share(elements, elements * FP32, "cpu")  # the offloaded optimizer steps on fp32 host gradients
    return Share(elements, elements * setup.dtype_bytes, GPU)


def optimizer_share(trainable: int, setup: EngineSetup) -> Share:
    elements = split(trainable, setup.world_size, setup.zero_stage >= 1) * optimizer_copies(setup)
    device = setup.offload_optimizer if setup.offload_optimizer != "none" else GPU
    return Share(elements, elements * FP32, device)


def engine_memory(params_total: int, trainable: int, setup: EngineSetup, trained: bool) -> EngineMemory:
    """One rank's parameters, gradients and optimizer state; a frozen engine has only parameters."""
    if not trained:
        trainable = 0
    return EngineMemory(param_share(params_total, setup), grad_share(trainable, setup),
                        optimizer_share(trainable, setup))


def lora_parameters(linears: list[tuple[int, int]], r: int) -> int:
    """Adapter parameters: A (r x in) and B (out x r) for every targeted Linear of shape (in, out)."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in linears)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
