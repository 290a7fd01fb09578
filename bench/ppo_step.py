"""Benchmark: seconds per PPO step of our stage on a fixed tiny setting, on CPU ranks.

    python bench/ppo_step.py [--steps 30] [--warmup 5] [--out bench/results/ppo_step.json]
    python bench/ppo_step.py --sizes     # three model sizes against a bare-PyTorch loop (bench/sizes.py)
    python bench/ppo_step.py --estimators gae,grpo,rloo,reinforce_pp   # beside TRL's GRPOTrainer (bench/estimators.py)

It builds a fixed setting in a temp dir (tokenizer, policy, reward/value model, prompts), then runs
the real stage through the CLI (`rlhf run` on a PPO-only config) three times: 1 rank ZeRO-0,
2 ranks ZeRO-2, 2 ranks ZeRO-3. From each run's `ppo/metrics.jsonl` it drops the warm-up steps
and reports medians: seconds per step (rollout + score + advantages + update, as the stage times
them), episodes/s, generated tokens/s and each phase's share; then the ZeRO-3 / ZeRO-2 ratio,
next to the peer numbers and targets from the performance issue.

The setting (printed with the result):
  policy     GPT-2, 2 layers x 64 wide, 4 heads, 64 positions, byte-level BPE of 400 tokens trained
             locally on movie-review text (with pad/bos/eos and a chat template): 129,792 parameters.
             Its EOS logit is pushed down at init (see `make_policy`), so every response is 16 tokens.
  reward     GPT2ForSequenceClassification of the same shape, one output; it is also the critic init.
  PPO        16 prompts of 4-8 words per step, 16 new tokens, temperature 1, 4 epochs of one minibatch
             of 16, fp32; OMP_NUM_THREADS=1 for every rank, 2 cores in all: the 1-rank run uses the
             second core through its value process (critic and reward model beside actor and
             reference, stages/ppo/value_process.py); two OpenMP threads on ops this small were
             slower (see bench/README.md).

Run it on an otherwise idle machine: the table records the highest load average seen during each
run and warns when other processes shared the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 400
N_POSITIONS = 64
ROLLOUT, NEW_TOKENS, EPOCHS, MINIBATCH = 16, 16, 4, 16
CPU_CORES = 2

# (name, ranks, DeepSpeed preset)
RUNS = [("1rank_zero0", 1, "zero0"), ("2rank_zero2", 2, "zero2"), ("2rank_zero3", 2, "zero3")]

# From the performance issue: the same tiny setting on the peers' PPO loops.
PEERS = {
    "openrlhf_1rank_s_per_step": 0.14,
    "deepspeed_chat_step3_1rank_s_per_step": 0.14,
    "trl_ppotrainer_1rank_s_per_step": 0.42,
    "openrlhf_zero3_over_zero2": 2.3,
    "deepspeed_chat_zero3_over_zero2": 3.8,
}
TARGET_SPEEDUP_OVER_FASTEST_PEER = 1.5
TARGET_ZERO3_OVER_ZERO2 = 1.3
PHASES = ("rollout", "score", "advantages", "update")


# ---------------------------------------------------------------- the fixed setting


def make_prompts(reviews, n: int, seed: int = 0) -> list[str]:
    """Review openings of 4-8 words (one row per review, lengths drawn with a fixed seed)."""
    rng = random.Random(seed)
    prompts = []
    for review in reviews:
        words = review.text.split()
        if len(words) >= 8:
            prompts.append(" ".join(words[: rng.randint(4, 8)]))
        if len(prompts) == n:
            break
    return prompts


def gpt2_config(tokenizer):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)


def make_policy(tokenizer, seed: int):
    """A random GPT-2 whose EOS logit is about -6.4 below the rest, so responses run to full length.

    The final LayerNorm's output has zero mean over the width, so with ln_f.bias = 1 (all ones) and
    the (tied) EOS embedding = -0.1 (all ones), the EOS logit is exactly -0.1 * 64 = -6.4 whatever
    the input, while the other logits only move by N(0, 0.16). EOS then has probability ~1e-5 per
    token: the comparison never depends on where samples happen to stop.
    """
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(tokenizer))
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[tokenizer.eos_token_id].fill_(-0.1)
    return model


def make_value_model(tokenizer, seed: int):
    import torch
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = gpt2_config(tokenizer)
    config.num_labels = 1
    return GPT2ForSequenceClassification(config)


def build_setting(workdir: Path, seed: int = 0) -> dict:
    """Tokenizer, policy, reward model and prompts under `workdir`; returns their paths and sizes."""
    from pipeline.models import train_tokenizer
    from pipeline.movie_reviews import load_reviews

    reviews = load_reviews()
    tokenizer = train_tokenizer((r.text for r in reviews[:3000]), VOCAB)
    policy, reward = make_policy(tokenizer, seed), make_value_model(tokenizer, seed + 1)
    paths = {"policy": workdir / "policy", "reward": workdir / "reward", "prompts": workdir / "prompts.jsonl"}
    for model, key in ((policy, "policy"), (reward, "reward")):
        model.save_pretrained(str(paths[key]), safe_serialization=True)
        tokenizer.save_pretrained(str(paths[key]))
    prompts = make_prompts(reviews[3000:], 512, seed)
    paths["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    from pipeline.generation import encode_prompts

    prompt_tokens = [len(x) for x in encode_prompts(tokenizer, prompts, 10**6)]
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
        "reward_parameters": sum(p.numel() for p in reward.parameters()),
        "vocab_size": len(tokenizer),
        "prompts": len(prompts),
        "prompt_tokens_mean": statistics.mean(prompt_tokens),
        "prompt_tokens_max": max(prompt_tokens),
    }


def ppo_config(setting: dict, steps: int) -> dict:
    paths = setting["paths"]
    return {
        "run": {"name": "bench-ppo-step", "seed": 0},
        "deepspeed": {"config": "zero0", "num_gpus": 1},
        "tracking": "none",
        "pretrain": {"enabled": False},
        "sft": {"enabled": False},
        "reward": {"enabled": False},
        "ppo": {
            "input": paths["policy"], "reward_model": paths["reward"],
            "data": {"train": paths["prompts"]},
            "rollout_batch_size": ROLLOUT, "minibatch_size": MINIBATCH, "ppo_epochs": EPOCHS,
            "max_new_tokens": NEW_TOKENS, "max_prompt_length": N_POSITIONS - NEW_TOKENS, "temperature": 1.0,
            "max_steps": steps, "logging_steps": 10, "save_steps": None,
        },
        "eval": {"enabled": False},
    }


# ---------------------------------------------------------------- running and reading


def rlhf_command() -> list[str]:
    script = Path(sys.executable).parent / "rlhf"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def run_logged(cmd: list[str], env: dict[str, str], log_path: Path, poll_s: float = 0.5,
               while_running: Callable[[int], None] | None = None) -> tuple[float, float]:
    """Run `cmd` with its output in `log_path`, calling `while_running(pid)` at each poll; returns (wall
    seconds, highest 1-minute load average seen while it ran). Raises with the log's tail on failure."""
    started, load = time.perf_counter(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while (code := proc.poll()) is None:
            if while_running is not None:
                while_running(proc.pid)
            load = max(load, os.getloadavg()[0])
            time.sleep(poll_s)
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {code}; log: {log_path}\n{tail}")
    return time.perf_counter() - started, load


def run_stage(config_path: Path, run_dir: Path, ranks: int, preset: str, threads: int,
              log_path: Path) -> tuple[float, float]:
    """`rlhf run` on CPU ranks; returns (wall seconds, highest 1-minute load average seen while it ran).

    Raises with the log's tail on failure.
    """
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = rlhf_command() + ["run", str(config_path), "--run-dir", str(run_dir),
                            f"deepspeed.num_gpus={ranks}", f"deepspeed.config={preset}"]
    return run_logged(cmd, env, log_path, poll_s=1.0)


def summarise(rows: list[dict], warmup: int) -> dict:
    """Medians over the steps after the warm-up, from metrics.jsonl rows."""
    kept = [r for r in rows if r["step"] > warmup]
    if not kept:
        raise SystemExit(f"only {len(rows)} steps logged; need more than --warmup {warmup}")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in kept)

    step_s = med("time/step_s")
    phase_s = {p: med(f"time/{p}_s") for p in PHASES}
    # per-step shares, then the median of each share, so the shares describe typical steps
    shares = {p: statistics.median(r[f"time/{p}_s"] / r["time/step_s"] for r in kept) for p in PHASES}
    return {
        "steps_measured": len(kept),
        "step_s_median": step_s,
        "step_s_min": min(r["time/step_s"] for r in kept),
        "step_s_max": max(r["time/step_s"] for r in kept),
        "episodes_per_s": ROLLOUT / step_s,
        # rollout_tokens_per_s is per rank (its own tokens over its own rollout time): sum the ranks
        "generated_tokens_per_s_rollout": med("time/rollout_tokens_per_s") * kept[0]["ranks"],
        "generated_tokens_per_s_step": statistics.median(
            r["ppo/response_length"] * ROLLOUT / r["time/step_s"] for r in kept),
        "response_length_mean": statistics.mean(r["ppo/response_length"] for r in kept),
        "eos_fraction_mean": statistics.mean(r["ppo/eos_fraction"] for r in kept),
        "phase_s_median": phase_s,
        "phase_share_median": shares,
    }


def read_metrics(path: Path, ranks: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{**r, "ranks": ranks} for r in rows if "time/step_s" in r]


# ---------------------------------------------------------------- report


def report(result: dict) -> str:
    s, runs = result["setting"], result["runs"]
    lines = [
        "PPO step benchmark (CPU ranks, fp32)",
        f"  policy: GPT-2 {s['n_layer']}x{s['n_embd']} ({s['n_head']} heads, {s['n_positions']} positions), "
        f"vocab {s['vocab_size']}, {s['policy_parameters']:,} parameters; reward/critic: same shape, "
        f"{s['reward_parameters']:,} parameters",
        f"  per step: {s['rollout_batch_size']} prompts (4-8 words, {s['prompt_tokens_mean']:.1f} tokens mean with "
        f"the chat template), {s['max_new_tokens']} new tokens, {s['ppo_epochs']} epochs x 1 minibatch of "
        f"{s['minibatch_size']}, temperature {s['temperature']}",
        f"  {s['steps']} steps, first {s['warmup']} dropped; medians over the rest; step = rollout + score + "
        f"advantages + update; {s['cpu_cores']} cores",
        "",
        f"  {'run':<12} {'threads':>7} {'s/step':>7} {'ep/s':>6} {'tok/s':>6} {'rollout':>8} {'score':>6} {'adv':>5} "
        f"{'update':>7} {'resp len':>8} {'wall':>6} {'load':>5}",
    ]
    for name, r in runs.items():
        sh = r["phase_share_median"]
        lines.append(
            f"  {name:<12} {r['omp_num_threads']:>7} {r['step_s_median']:7.3f} {r['episodes_per_s']:6.1f} "
            f"{r['generated_tokens_per_s_step']:6.0f} {sh['rollout']:8.0%} {sh['score']:6.0%} "
            f"{sh['advantages']:5.0%} {sh['update']:7.0%} {r['response_length_mean']:8.2f} {r['wall_s']:5.0f}s "
            f"{r['load_average_max']:5.1f}")
    lines += [
        "  (threads: OMP_NUM_THREADS per rank; tok/s: generated tokens per second of whole step; phase columns:",
        "   median share of the step; wall: the whole `rlhf run`, including launch, model loading and saving;",
        "   load: highest 1-minute load average seen around the run)",
    ]
    busy = [n for n, r in runs.items() if r["load_average_max"] > s["cpu_cores"] + 0.5]
    if busy:
        lines.append(f"  WARNING: the machine was busy during {', '.join(busy)} (load above {s['cpu_cores']} cores): "
                     "other processes share the cores and these times are inflated; rerun on an idle machine")
    c = result.get("comparison")
    if not c:
        return "\n".join(lines)
    lines += [
        "",
        f"  1 rank:  {runs['1rank_zero0']['step_s_median']:.3f} s/step vs OpenRLHF / DeepSpeed-Chat 0.14, "
        f"TRL PPOTrainer 0.42 -> {c['speedup_over_fastest_peer']:.2f}x the fastest peer's episodes/s "
        f"(target >= {TARGET_SPEEDUP_OVER_FASTEST_PEER}x, i.e. <= {c['target_1rank_s_per_step']:.3f} s/step): "
        f"{'MET' if c['target_1rank_met'] else 'NOT MET'}",
        f"  2 ranks: ZeRO-3 / ZeRO-2 step time {c['zero3_over_zero2']:.2f}x vs OpenRLHF 2.3x, DeepSpeed-Chat 3.8x "
        f"(target <= {TARGET_ZERO3_OVER_ZERO2}x): {'MET' if c['target_zero3_met'] else 'NOT MET'}",
    ]
    return "\n".join(lines)


def compare(runs: dict) -> dict | None:
    if any(name not in runs for name, _, _ in RUNS):
        return None
    fastest_peer = min(PEERS["openrlhf_1rank_s_per_step"], PEERS["deepspeed_chat_step3_1rank_s_per_step"])
    one = runs["1rank_zero0"]["step_s_median"]
    ratio = runs["2rank_zero3"]["step_s_median"] / runs["2rank_zero2"]["step_s_median"]
    target_s = fastest_peer / TARGET_SPEEDUP_OVER_FASTEST_PEER
    return {
        "speedup_over_fastest_peer": fastest_peer / one,
        "target_1rank_s_per_step": target_s,
        "target_1rank_met": one <= target_s,
        "zero3_over_zero2": ratio,
        "target_zero3_met": ratio <= TARGET_ZERO3_OVER_ZERO2,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="PPO steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo_step.json"), help="result JSON")
    parser.add_argument("--workdir", default=None, help="keep the setting and run dirs here (default: a temp dir)")
    parser.add_argument("--runs", default=",".join(n for n, _, _ in RUNS),
                        help="comma-separated subset of: " + ", ".join(n for n, _, _ in RUNS))
    parser.add_argument("--threads-per-rank", type=int, default=None,
                        help="OMP_NUM_THREADS for every rank (default: 1)")
    parser.add_argument("--sizes", action="store_true",
                        help="the same step at 130k, 1.6M (demo) and 25M parameters, each against the bare-PyTorch "
                             "loop (bench/sizes.py); default --out bench/results/ppo_sizes.json")
    parser.add_argument("--only", default="130k,1.6M,25M", help="with --sizes: comma-separated subset of sizes")
    parser.add_argument("--bare-threads", default="1",
                        help="with --sizes: thread counts for the bare loop, e.g. 1,2 (the fastest is the ceiling)")
    parser.add_argument("--estimators", default=None,
                        help="comma-separated ppo.advantage_estimator values (gae, grpo, rloo, reinforce_pp; NAME@N on N "
                             "ranks, e.g. grpo@2): our step "
                             "for each at equal prompts x samples x new tokens, beside TRL's GRPOTrainer "
                             "(bench/estimators.py); default --out bench/results/ppo_estimators.json")
    parser.add_argument("--repeats", type=int, default=1, help="with --estimators: run every row this many times, "
                                                               "interleaved; report the median")
    parser.add_argument("--no-trl", action="store_true", help="with --estimators: leave out the TRL GRPOTrainer row")
    parser.add_argument("--smoke", action="store_true", help="with --estimators: 3 steps per row, 1 dropped (checks "
                                                             "that it runs; the times mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke and not args.estimators:
        parser.error("--smoke goes with --estimators")
    if args.estimators:
        import estimators

        names = args.estimators.split(",")
        if not names or any(estimators.parse_row(n) is None for n in names):
            parser.error(f"--estimators: choices are {', '.join(estimators.ESTIMATORS)}, each optionally @N "
                         "for N ranks (grpo@2)")
        explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        out = args.out if "--out" in explicit else str(ROOT / "bench" / "results" / "ppo_estimators.json")
        steps = args.steps if "--steps" in explicit or not args.smoke else estimators.SMOKE_STEPS
        warmup = args.warmup if "--warmup" in explicit or not args.smoke else estimators.SMOKE_WARMUP
        if steps <= warmup or args.repeats < 1:
            parser.error("--steps must exceed --warmup, and --repeats be >= 1")
        estimators.main(names, Path(out), args.workdir, steps, warmup, args.repeats, trl=not args.no_trl)
        return
    if args.sizes:
        import sizes

        names = args.only.split(",")
        if set(names) - set(sizes.STEPS):
            parser.error(f"--only: choices are {', '.join(sizes.STEPS)}")
        out = args.out if "--out" in (argv or sys.argv) else str(ROOT / "bench" / "results" / "ppo_sizes.json")
        selected = [r for r in RUNS if r[0] in args.runs.split(",")]
        sizes.main(names, Path(out), args.workdir, selected, tuple(int(t) for t in args.bare_threads.split(",")))
        return
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    selected = [r for r in RUNS if r[0] in args.runs.split(",")]
    unknown = set(args.runs.split(",")) - {n for n, _, _ in RUNS}
    if unknown:
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}; choices: {', '.join(n for n, _, _ in RUNS)}")

    sys.path.insert(0, str(ROOT))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"[bench] building the setting in {workdir}", flush=True)
        setting = build_setting(workdir)
        config_path = workdir / "ppo.yaml"
        config_path.write_text(yaml.safe_dump(ppo_config(setting, args.steps), sort_keys=False))
        runs = {}
        for name, ranks, preset in selected:
            run_dir = workdir / "runs" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            threads = args.threads_per_rank or 1
            print(f"[bench] {name}: rlhf run ({ranks} rank(s), {preset}, {threads} thread(s) per rank, "
                  f"{args.steps} steps)", flush=True)
            wall, load = run_stage(config_path, run_dir, ranks, preset, threads, workdir / f"{name}.log")
            rows = read_metrics(run_dir / "ppo" / "metrics.jsonl", ranks)
            runs[name] = {"ranks": ranks, "deepspeed": preset, "omp_num_threads": threads, "wall_s": wall,
                          "load_average_max": load,
                          **summarise(rows, args.warmup), "per_step": [
                              {k: r[k] for k in ("step", "time/step_s", *(f"time/{p}_s" for p in PHASES))}
                              for r in rows]}
            print(f"[bench] {name}: {runs[name]['step_s_median']:.3f} s/step", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    import torch
    import deepspeed
    import transformers

    result = {
        "setting": {
            "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": N_POSITIONS,
            "vocab_size": setting["vocab_size"], "policy_parameters": setting["policy_parameters"],
            "reward_parameters": setting["reward_parameters"], "prompts": setting["prompts"],
            "prompt_tokens_mean": setting["prompt_tokens_mean"], "prompt_tokens_max": setting["prompt_tokens_max"],
            "rollout_batch_size": ROLLOUT, "minibatch_size": MINIBATCH, "ppo_epochs": EPOCHS,
            "max_new_tokens": NEW_TOKENS, "temperature": 1.0, "dtype": "fp32", "device": "cpu",
            "cpu_cores": CPU_CORES, "steps": args.steps, "warmup": args.warmup,
        },
        "runs": runs,
        "peers": PEERS,
        "targets": {"speedup_over_fastest_peer": TARGET_SPEEDUP_OVER_FASTEST_PEER,
                    "zero3_over_zero2": TARGET_ZERO3_OVER_ZERO2},
        "comparison": compare(runs),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                        "machine": platform.machine(), "os_cpu_count": os.cpu_count()},
    }
    print()
    print(report(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[bench] result: {out}")


if __name__ == "__main__":
    main()
