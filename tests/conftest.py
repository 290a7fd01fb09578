"""Shared test helpers: the `rlhf` command, running it under a timeout, killing it mid-run, and the
in-process process-group teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _bind_library_log_handlers() -> None:
    """datasets and transformers give their loggers a handler on the sys.stderr of the moment they are first
    imported or used. When that moment falls in a test using `capsys`, the handler keeps that test's capture
    stream, which is closed after it, and every later log line of theirs prints "--- Logging error ---" and a
    traceback into whichever test runs next in the worker (seen: tests/test_errors.py's refusals failing on
    "Traceback" after tests/test_errors_units.py). Bound here, at conftest import, they keep pytest's own
    session-long capture."""
    import datasets  # noqa: F401 - configures its handler at import
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()  # configures transformers' handler


_bind_library_log_handlers()

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
_SCRIPT = Path(sys.executable).with_name("rlhf")
RLHF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pipeline.cli"]


def communicate(args, env: dict[str, str], timeout: int, merge_output: bool = False) -> tuple[int, str, str]:
    """`rlhf ARGS` in its own process group: (exit code, stdout, stderr), stderr folded into stdout when
    `merge_output`. Past `timeout` the whole group (CLI, launcher, ranks) is killed and the test fails."""
    proc = subprocess.Popen([*RLHF, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"rlhf {' '.join(map(str, args))} ran over {timeout}s:\n{(stdout + (stderr or ''))[-4000:]}")
    return proc.returncode, stdout, stderr or ""


def stopped_ranks(pgid: int) -> int:
    """How many processes of process group `pgid` are stopped (state T): ranks held at a fault point."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        count += fields[0] == "T" and int(fields[2]) == pgid  # fields: state, ppid, pgrp, ...
    return count


def kill_at_checkpoint(cmd: list[str], checkpoint: Path, log_path: Path, env: dict[str, str], timeout: int,
                       ranks: int = 1, cwd: Path | None = None) -> None:
    """Run `cmd` (output to `log_path`) until its `ranks` ranks have finished `checkpoint` (RUN/<stage>/checkpoint-N)
    and stopped there, then SIGKILL its whole process group (the CLI, the launcher and the ranks).

    Not a race against a poll: `RLHF_TEST_FAULT` (pipeline/checkpoint.py) makes each rank stop itself once the
    checkpoint is complete, so the run can neither finish nor go on before the kill. Fails the test if the
    ranks never stop there.
    """
    from pipeline.checkpoint import FAULT_ENV

    fault = f"{checkpoint.parent.name}:{checkpoint.name.split('-')[1]}:saved"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**env, FAULT_ENV: fault}, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while stopped_ranks(proc.pid) < ranks and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        held = stopped_ranks(proc.pid) == ranks
        with contextlib.suppress(ProcessLookupError):  # a run that ended on its own left no group behind
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert held, f"the ranks never stopped after {checkpoint}:\n{log_path.read_text()[-4000:]}"


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
