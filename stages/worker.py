"""The module the DeepSpeed launcher starts on every rank: run one stage of a run dir.

    python -m deepspeed.launcher.runner ... --module stages.worker --run-dir RUN --stage sft

The work is `pipeline.worker`'s; this module only gives it the stage to run, so the infrastructure
never imports a stage.
"""

from __future__ import annotations

from pipeline import worker
from stages import load_stage


def main(argv: list[str] | None = None) -> None:
    worker.main(argv, lambda name: load_stage(name).run)


if __name__ == "__main__":
    main()
