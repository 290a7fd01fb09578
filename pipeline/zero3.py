"""ZeRO-3 without its per-module cost where a whole model may be materialised at once.

DeepSpeed's ZeRO-3 fetches each submodule's weights in a forward pre-hook, releases them in a
post-hook, does the same again in backward, and checks every parameter read (`ZeROOrderedDict`)
and every `F.linear` call (`zero3_linear_wrap`). On small and mid-size models that Python, not
the collectives, is most of the step. Where a whole model may be gathered, we gather it in one
coalesced all-gather, take that machinery off for the duration and put the very same pieces back:

  gathered_module      rollout and no-grad scoring: always (the issue's "gather once per rollout").
  gathered_for_update  a training forward + backward: only when the model's parameter count fits
                       DeepSpeed's own budget of live parameters (`stage3_max_live_parameters`);
                       bigger models keep DeepSpeed's per-module fetch and release.

Gradients are reduced and partitioned exactly as DeepSpeed always does it: by its hooks on each
parameter's gradient accumulation (and on leaf modules' backward), which stay in place.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _engine_stage(engine) -> int:
    """An engine's ZeRO stage (0 for a plain module); `ds_config.zero_stage` reads a config dict."""
    return engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0


@contextlib.contextmanager
def gathered_module(engine) -> Iterator[torch.nn.Module]:
    """The engine's module with full weights for a whole rollout, scoring pass or update pass.

    Outside ZeRO-3 this just yields the module. Under ZeRO-3 it gathers every parameter in one
    coalesced all-gather (`deepspeed.zero.GatheredParameters` issues one collective per parameter),
    takes DeepSpeed's per-module machinery off for the duration, then puts it back and re-partitions
    the weights. The weights are not modified inside (an optimizer step comes after the exit).
    """
    if _engine_stage(engine) != 3:
        yield engine.module
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # every rank holds the same parameter list in the same order, so the collective matches
    partitioned = [p for p in engine.module.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if partitioned:
        partitioned[0].all_gather_coalesced(partitioned).wait()
    try:
        with zero3_hooks_suspended(engine), plain_parameter_reads(engine.module), plain_linear():
            yield engine.module
    finally:
        if partitioned:
            partitioned[0].partition(param_list=partitioned, has_been_updated=False)


def fits_live_budget(engine) -> bool:
    """True when the whole model is within DeepSpeed's `stage3_max_live_parameters` for this engine."""
    count = getattr(engine, "_rlhf_parameter_count", None)
    if count is None:
        count = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        engine._rlhf_parameter_count = count
    return count <= engine.zero_max_live_parameters()


@contextlib.contextmanager
def gathered_for_update(engine) -> Iterator[None]:
    """Around one training forward + backward: the whole model gathered once when it fits the live
    budget (see the module docstring), else DeepSpeed's own per-module fetching. Step after the exit."""
    if _engine_stage(engine) == 3 and fits_live_budget(engine):
        with gathered_module(engine):
            yield
    else:
        yield


@contextlib.contextmanager
def zero3_hooks_suspended(engine) -> Iterator[None]:
    """Take a ZeRO-3 engine's module hooks (DeepSpeed's fetch/release hooks on every submodule and the
    engine's forward prologue/epilogue) out for a while and put the very same ones back.

    TRL's `remove_hooks`/`add_hooks` re-register the hooks instead: DeepSpeed then numbers every
    module anew and drops its recorded fetch order, so the next training forward and backward
    run without prefetch while a new order is recorded (with a check across ranks). Here each
    hook goes back under its own handle id and in its place, so the recorded order stays valid.
    """
    offload = getattr(engine.optimizer, "parameter_offload", None) or engine.optimizer
    handles = [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]
    # The engine's own pre/post hooks on its module: per call, ZeRO-3 flags every submodule's
    # parameter dict for fetch-on-read (re-wrapping plain dicts) and timers start and stop.
    handles += [h for h in (engine.module_forward_pre_hook, engine.module_forward_post_hook) if h is not None]
    dicts = {}  # id(dict) -> (dict, its keys in order): every dict a hook is removed from
    removed = []
    for handle in handles:
        refs = (handle.hooks_dict_ref, *handle.extra_dict_ref)
        for d in filter(lambda d: d is not None and handle.id in d, (ref() for ref in refs)):
            dicts.setdefault(id(d), (d, list(d)))
            removed.append((d, handle.id, d.pop(handle.id)))
    try:
        yield
    finally:
        for d, key, value in removed:
            d[key] = value
        for d, order in dicts.values():
            for key in order:
                if key in d and hasattr(d, "move_to_end"):
                    d.move_to_end(key)


@contextlib.contextmanager
def plain_parameter_reads(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule reads its parameters from a plain dict instead of DeepSpeed's `ZeROOrderedDict`,
    whose `__getitem__` checks each read for a parameter to fetch (in Python, per read, per token).

    The same Parameter objects, so gradients and the gathered data are unaffected; the original
    dicts go back on exit.
    """
    swapped = []
    for m in module.modules():
        if type(m._parameters) is not dict:
            swapped.append((m, m._parameters))
            m._parameters = dict(m._parameters)
    try:
        yield
    finally:
        for m, original in swapped:
            m._parameters = original


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """`F.linear` as PyTorch's own while the weights are gathered.

    ZeRO-3 replaces `torch.nn.functional.linear` process-wide with an autograd Function that
    re-fetches the weight in backward (`memory_efficient_linear`); with the whole model gathered
    there is nothing to re-fetch, and the Function costs a Python call per use.
    """
    import torch.nn.functional as F
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    original = getattr(Init, "linear_bk", None)
    patched = F.linear
    if original is None or patched is original:
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = patched
