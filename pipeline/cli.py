"""The `rlhf` command.

    rlhf run CONFIG [--stages pretrain,sft] [--run-dir DIR] [KEY=VALUE ...]
    rlhf resume RUN_DIR [--stage S --from RUN_DIR/S/checkpoint-N] [--force]
    rlhf status RUN_DIR

Errors a user can fix print as one line and exit with code 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from pipeline.errors import StageFailed, UserError


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.orchestrator import run_pipeline

    run_dir = run_pipeline(args.config, args.overrides, args.stages, args.run_dir)
    print(f"pipeline finished; run dir: {run_dir.root}  (see `rlhf status {run_dir.root}`)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.orchestrator import resume_pipeline

    run_dir = resume_pipeline(args.run_dir, args.stage, args.from_path, args.force)
    print(f"pipeline finished; run dir: {run_dir.root}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.orchestrator import status_lines
    from pipeline.rundir import RunDir

    print("\n".join(status_lines(RunDir(Path(args.run_dir)))))
    return 0


COMMANDS = {
    "run": cmd_run,
    "resume": cmd_resume,
    "status": cmd_status,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="pretrain -> SFT -> reward model -> PPO")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the enabled stages of a pipeline config")
    run.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.max_steps=50 run.seed=3")
    run.add_argument("--stages", help="comma-separated subset, e.g. pretrain,sft")
    run.add_argument("--run-dir", help="run dir (default: <run.output_dir>/<run.name>)")

    resume = sub.add_parser("resume", help="continue a run dir: skip finished stages, resume the interrupted one")
    resume.add_argument("run_dir")
    resume.add_argument("--stage", help="resume only this stage")
    resume.add_argument("--from", dest="from_path", help="checkpoint dir to resume the stage from")
    resume.add_argument("--force", action="store_true",
                        help="resume even if the checkpoint was made with a different stage config")

    status = sub.add_parser("status", help="show each stage's state, inputs, metrics and checkpoints")
    status.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # Overrides may come before or after options (`run CFG --run-dir D a.b=1`); argparse's
    # positional matching stops at the first option, so collect the rest ourselves.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    assert set(COMMANDS) == set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    try:
        code = COMMANDS[args.command](args)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        code = err.exit_code
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        code = err.returncode if 0 < err.returncode < 128 else 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
