"""Stages run by the orchestrator in this process, so a test can watch them from inside.

`launcher_in_process()` replaces DeepSpeed's launcher with a call of the worker's `run_stage` here (rank 0
of 1), as tests/test_architectures.py does; everything else (config, preflight, manifests, hand-offs,
resume) is what `rlhf run` does. It yields the MonkeyPatch that undoes it, so a test can also wrap a
stage's own functions (spies) for the same span, module-scoped fixtures included.

By default a stage's error is raised here, where the test can catch it. With `as_launcher=True` the stage
runs as a launched rank does: through the worker's `main`, its output appended to the stage's launch log and
its refusal turned into the rank's exit code, which the orchestrator then reports (`stage 'sft' failed ...`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.launch import free_port
from tests.conftest import destroy_process_group


@contextlib.contextmanager
def launcher_in_process(as_launcher: bool = False) -> Iterator[pytest.MonkeyPatch]:
    from pipeline import orchestrator, worker
    from pipeline.rundir import RunDir
    from stages import load_stage

    with pytest.MonkeyPatch.context() as mp:
        def run_here(cmd: list[str], env: dict[str, str], log_path: Path, show_all: bool = False) -> int:
            arg = dict(zip(cmd, cmd[1:]))
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}.items():
                mp.setenv(key, value)
            resume = Path(arg["--resume-from"]) if "--resume-from" in arg else None
            try:
                if as_launcher:
                    return as_rank(cmd[cmd.index("--run-dir"):], log_path)
                worker.run_stage(RunDir(Path(arg["--run-dir"])), arg["--stage"], load_stage(arg["--stage"]).run,
                                 resume)
            finally:
                destroy_process_group()
            return 0

        mp.setattr(orchestrator, "run_launcher", run_here)
        yield mp


def as_rank(worker_args: list[str], log_path: Path) -> int:
    """`stages.worker` ARGS as a launched rank: its output appended to `log_path`; returns its exit code."""
    from stages import worker

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            worker.main(worker_args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(output.getvalue())
    return code


def assert_merged_lora(merged: dict, base: dict, adapter: dict, a_key_of, scale: float) -> set[str]:
    """Every weight of a merged LoRA hand-off is W + scale * B A where `adapter` holds an A for it (at
    `a_key_of(key)`; B beside it, trained away from zero), and the base's own weight everywhere else.
    Returns the names of the adapted modules."""
    import torch

    assert merged.keys() == base.keys()
    adapted = set()
    for key in base:
        a_key = a_key_of(key)
        if a_key not in adapter:
            assert torch.equal(merged[key], base[key]), f"{key} changed without an adapter"
            continue
        a, b = adapter[a_key], adapter[a_key.replace("lora_A", "lora_B")]
        assert b.abs().max() > 0, f"{key}: the adapter did not train"
        torch.testing.assert_close(merged[key], base[key] + scale * b @ a, rtol=0, atol=1e-6)
        adapted.add(key.split(".")[-2])
    return adapted


def spy(mp: pytest.MonkeyPatch, owner, name: str, record: list) -> None:
    """Wrap `owner.name` for the MonkeyPatch's span: each call appends (args, kwargs, result) to `record`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        record.append((args, kwargs, result))
        return result

    mp.setattr(owner, name, wrapper)
