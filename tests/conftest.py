"""Shared test helpers."""

from __future__ import annotations


def destroy_process_group() -> None:
    """End this process's torch.distributed group and forget DeepSpeed's handles on it.

    DeepSpeed keeps its communication backend and its world/data-parallel groups in module globals;
    left behind, the next in-process group (another test's) would be used through the dead one's
    handles ("Group ... is not registered").
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._MODEL_PARALLEL_GROUP = None
    groups._TENSOR_MODEL_PARALLEL_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, groups._ALL_TO_ALL_GROUP):
        cache.clear()
