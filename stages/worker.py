"""The module the DeepSpeed launcher starts on every rank: run one stage of a run dir.

    python -m deepspeed.launcher.runner ... --module stages.worker --run-dir RUN --stage sft

The work is `pipeline.worker`'s; this module only gives it the stage to run, so the infrastructure
never imports a stage.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline import worker
from stages import load_stage


def main(argv: list[str] | None = None) -> None:
    worker.main(argv, lambda name: load_stage(name).run)


def leave(code: int) -> None:
    """Exit without interpreter teardown, once the stage's work is done and on disk.

    By then every rank has passed the last barrier, the tracker has finished and the process group is
    destroyed. What teardown would add is C++ destructors of library threads, and a thread still
    joinable there aborts the rank ("terminate called without an active exception", exit -6): seen on
    two CPU ranks under ZeRO-3 a second after the PPO checkpoint and its manifest were published, and
    the launcher then reported the whole stage as failed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def whole_lines() -> None:
    """Each printed line reaches the launcher's pipe in one write. The launcher runs ranks with `python -u`,
    where print() writes the text and its newline separately, so another rank's output could land between
    them: in the stage log, and on the terminal as a `[ppo] step ...` line with a stranger's text glued on."""
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=False)


if __name__ == "__main__":
    whole_lines()
    try:
        main()
    except SystemExit as exit_:  # a refusal: its message is printed, its code is the rank's
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
        leave(exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1)
    leave(0)
