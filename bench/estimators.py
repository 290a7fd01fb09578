"""`ppo_step.py --estimators`: our step per advantage estimator, beside TRL's GRPOTrainer, at equal work.

    python bench/ppo_step.py --estimators gae,grpo,rloo,reinforce_pp [--steps 30] [--warmup 5] [--repeats 1]
    python bench/ppo_step.py --estimators gae,grpo --smoke      # 3 steps each, seconds of work: checks it runs

Every row does the same work per step on the same tiny setting (ppo_step.py's: GPT-2 2 x 64, 129,792
parameters, BPE of 400 tokens, reward model of the same shape, review openings of 4-8 words):
  - `--prompts` prompts x `--samples` samples per prompt, each exactly `--new-tokens` tokens (EOS held off:
    `ppo.min_new_tokens` on our side, `min_new_tokens` in TRL's generation kwargs), temperature 1;
  - one optimizer step per generation batch: one epoch of one minibatch of prompts x samples (TRL:
    `num_iterations` = `steps_per_generation` = `gradient_accumulation_steps` = 1);
  - the KL to the reference at coefficient 0.05: our GRPO with `ppo.kl_in: loss` (k3 in the loss, as TRL's
    `beta`), the other estimators with the default `ppo.kl_in: reward`;
  - fp32 on CPU, OMP_NUM_THREADS=1 in every process.

Our rows run the real stage (`rlhf run`, 1 rank, ZeRO-0) with `ppo.advantage_estimator` set; `gae`
builds four models (its critic and the reward model go to a second process, on the second core),
the critic-free ones three (one process). A row `name@N` runs on N CPU ranks (ZeRO-0, data parallel):
`grpo@2` is GRPO on as many processes, and cores, as `gae` on one rank. The TRL row runs bench/trl_grpo.py in its own process. Each
row's step time is the median over the steps after `--warmup`; with `--repeats R` the rows run R times,
interleaved, and the median of the R medians is reported.

Targets (issue 21; benchmark, not test): our GRPO step <= 0.67x TRL GRPOTrainer's, and <= 0.8x our own
PPO (gae) step.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

import ppo_step as base

ROOT = base.ROOT
BENCH = Path(__file__).resolve().parent
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
TRL_ROW = "trl_grpo"
PROMPTS, SAMPLES, NEW_TOKENS, KL_COEF = 4, 4, 16, 0.05
TARGET_OVER_TRL = 0.67
TARGET_OVER_GAE = 0.8
SMOKE_STEPS, SMOKE_WARMUP = 3, 1


def estimator_config(setting: dict, estimator: str, steps: int, prompts: int, samples: int, new_tokens: int) -> dict:
    config = base.ppo_config(setting, steps)
    config["run"]["name"] = f"bench-{estimator}"
    config["ppo"].update({
        "rollout_batch_size": prompts, "samples_per_prompt": samples, "minibatch_size": prompts * samples,
        "ppo_epochs": 1, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
        "max_prompt_length": base.N_POSITIONS - new_tokens, "kl_coef": KL_COEF,
        "advantage_estimator": estimator, "logging_steps": 10**6,
    })
    if estimator == "grpo":
        config["ppo"]["kl_in"] = "loss"
    return config


def summarise(rows: list[dict], warmup: int, samples_per_step: int) -> dict:
    """Medians over the steps after the warm-up, for any rows with `time/step_s` and `time/<phase>_s`."""
    kept = [r for r in rows if r["step"] > warmup]
    if not kept:
        raise SystemExit(f"only {len(rows)} steps logged; need more than --warmup {warmup}")
    phases = [k[len("time/"):-len("_s")] for k in kept[0]
              if k.startswith("time/") and k.endswith("_s") and k != "time/step_s" and not k.endswith("per_s")]
    step_s = statistics.median(r["time/step_s"] for r in kept)
    length = statistics.mean(r["response_length"] for r in kept)
    tokens = statistics.median(r["generated_tokens"] for r in kept)
    if abs(tokens - length * samples_per_step) > 0.5:
        raise SystemExit(f"{tokens} tokens generated per step, expected {samples_per_step} x {length:.2f}")
    return {
        "steps_measured": len(kept),
        "step_s_median": step_s,
        "step_s_min": min(r["time/step_s"] for r in kept),
        "step_s_max": max(r["time/step_s"] for r in kept),
        "samples_per_s": samples_per_step / step_s,
        "generated_tokens_per_step": tokens,
        "generated_tokens_per_s": tokens / step_s,
        "ms_per_generated_token": 1000 * step_s / tokens,
        "response_length_mean": length,
        "phase_s_median": {p: statistics.median(r[f"time/{p}_s"] for r in kept) for p in phases},
        "phase_share_median": {p: statistics.median(r[f"time/{p}_s"] / r["time/step_s"] for r in kept)
                               for p in phases},
    }


def engines_built(run_dir: Path) -> list[str] | None:
    manifest = run_dir / "ppo" / "final" / "manifest.json"
    if not manifest.exists():
        return None
    return list(json.loads(manifest.read_text()).get("metrics", {}).get("sharding", {}).get("engines", {})) or None


def parse_row(name: str) -> tuple[str, int] | None:
    """A row name: an estimator, on one rank, or `estimator@N` on N CPU ranks (ZeRO-0, data parallel);
    None for anything else."""
    estimator, at, ranks = name.partition("@")
    if estimator not in ESTIMATORS or (at and not (ranks.isdigit() and int(ranks) >= 1)):
        return None
    return estimator, int(ranks or 1)


def processes(estimator: str, ranks: int) -> int:
    """One per rank; gae on one CPU rank adds its value process (critic and reward model, second core)."""
    return 2 if estimator == "gae" and ranks == 1 else ranks


def run_ours(setting: dict, workdir: Path, name: str, steps: int, warmup: int, shape: tuple[int, int, int],
             tag: str) -> dict:
    prompts, samples, new_tokens = shape
    estimator, ranks = parse_row(name)
    label = name.replace("@", "_rank")
    config_path = workdir / f"{label}.yaml"
    config_path.write_text(yaml.safe_dump(estimator_config(setting, estimator, steps, *shape), sort_keys=False))
    run_dir = workdir / "runs" / f"{label}{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    wall, load = base.run_stage(config_path, run_dir, ranks, "zero0", 1, workdir / f"{label}{tag}.log")
    # tokens counted by the stage: a rank's response tokens over its rollout time, times that time (on several
    # ranks, metrics.jsonl holds the mean over ranks, each rank generating its share of the rows)
    rows = [{**r, "response_length": r["ppo/response_length"],
             "generated_tokens": ranks * round(r["time/rollout_tokens_per_s"] * r["time/rollout_s"])}
            for r in base.read_metrics(run_dir / "ppo" / "metrics.jsonl", ranks)]
    engines = engines_built(run_dir)
    return {"side": "ours", "estimator": estimator, "ranks": ranks, "engines": engines,
            "processes": processes(estimator, ranks), "omp_num_threads": 1, "wall_s": wall,
            "load_average_max": load, **summarise(rows, warmup, prompts * samples),
            "per_step": [{k: v for k, v in r.items() if k.startswith("time/") or k in ("step", "generated_tokens")}
                         for r in rows]}


def run_trl(setting: dict, workdir: Path, steps: int, warmup: int, shape: tuple[int, int, int], tag: str) -> dict:
    prompts, samples, new_tokens = shape
    paths, out, log_path = setting["paths"], workdir / f"trl{tag}.json", workdir / f"trl{tag}.log"
    cmd = [sys.executable, str(BENCH / "trl_grpo.py"), "--policy", paths["policy"], "--reward", paths["reward"],
           "--prompts", paths["prompts"], "--steps", str(steps), "--warmup", str(warmup),
           "--prompts-per-step", str(prompts), "--samples", str(samples), "--new-tokens", str(new_tokens),
           "--beta", str(KL_COEF), "--threads", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    wall, load = base.run_logged(cmd, env, log_path)
    trl = json.loads(out.read_text())
    rows = [{**r, "response_length": r["completion_tokens"] / r["completions"],
             "generated_tokens": r["completion_tokens"]} for r in trl["per_step"]]
    engines = ["policy"] + ["reference"] * trl["reference_model"] + ["reward"]
    return {"side": "trl", "estimator": "grpo", "engines": engines, "processes": 1,
            "omp_num_threads": trl["torch_threads"], "wall_s": wall, "load_average_max": load,
            **summarise(rows, warmup, prompts * samples),
            "trl": {k: v for k, v in trl.items() if k not in ("per_step", "phase_s_median", "phase_share_median")},
            "per_step": [{k: v for k, v in r.items() if k.startswith("time/") or k in ("step", "generated_tokens")}
                         for r in rows]}


def combine(repeats: list[dict]) -> dict:
    """One row from its repeats: the median of the repeats' step medians, phases alike; the rest from the first."""
    first = dict(repeats[0])
    if len(repeats) > 1:
        for key in ("step_s_median", "samples_per_s", "generated_tokens_per_s", "ms_per_generated_token"):
            first[key] = statistics.median(r[key] for r in repeats)
        first["phase_s_median"] = {p: statistics.median(r["phase_s_median"][p] for r in repeats)
                                   for p in first["phase_s_median"]}
        first["load_average_max"] = max(r["load_average_max"] for r in repeats)
    first["repeats_step_s_median"] = [r["step_s_median"] for r in repeats]
    return first


def compare(rows: dict) -> dict:
    """Our GRPO over TRL's and over our gae, on the median steps (the verdict) and on the fastest steps (the
    least disturbed by other processes: on a busy machine, a hint of what an idle one would say)."""
    out: dict = {}
    # gae on one rank already has two processes (its value process): grpo@2 is GRPO on as many
    for key, ours, other, target in (("ours_grpo_over_trl_grpo", "grpo", TRL_ROW, TARGET_OVER_TRL),
                                     ("ours_grpo_over_ours_gae", "grpo", "gae", TARGET_OVER_GAE),
                                     ("ours_grpo@2_over_ours_gae", "grpo@2", "gae", TARGET_OVER_GAE)):
        if ours in rows and other in rows:
            ratio = rows[ours]["step_s_median"] / rows[other]["step_s_median"]
            out[key] = {"ratio": ratio, "target": target, "met": ratio <= target,
                        "ratio_of_fastest_steps": rows[ours]["step_s_min"] / rows[other]["step_s_min"],
                        "processes": [rows[ours]["processes"], rows[other]["processes"]]}
    return out


PHASE_COLUMNS = {"rollout": "rollout", "score": "score", "advantages": "adv", "update": "update"}


def report(result: dict) -> str:
    s = result["setting"]
    lines = [
        "GRPO, RLOO, REINFORCE++ and PPO (gae) steps beside TRL's GRPOTrainer "
        "(CPU, fp32, OMP_NUM_THREADS=1 per process)",
        f"  per step: {s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples x {s['new_tokens']} new "
        f"tokens (EOS held off), one optimizer step (1 epoch x 1 minibatch of "
        f"{s['prompts_per_step'] * s['samples_per_prompt']}), KL coef {s['kl_coef']}; "
        f"policy {s['policy_parameters']:,} parameters",
        f"  {s['steps']} steps per row, first {s['warmup']} dropped, medians over the rest"
        + (f"; median of {s['repeats']} interleaved repeats" if s["repeats"] > 1 else "")
        + f"; load {result['load_start']} at the start, {result['load_end']} at the end",
        "",
        f"  {'row':<14} {'models':>6} {'procs':>5} {'s/step':>7} {'min-max':>13} {'ms/tok':>6} {'tok/s':>6} "
        + " ".join(f"{h:>7}" for h in PHASE_COLUMNS.values()) + f" {'resp len':>8} {'wall':>5} {'load':>5}",
    ]
    for name, r in result["rows"].items():
        ph = r["phase_s_median"]
        cells = " ".join(f"{ph[p]:7.3f}" if p in ph else f"{'-':>7}" for p in PHASE_COLUMNS)
        models = len(r["engines"]) if r["engines"] else "?"
        lines.append(
            f"  {name:<14} {models:>6} {r['processes']:>5} {r['step_s_median']:7.3f} "
            f"{r['step_s_min']:6.3f}-{r['step_s_max']:<6.3f} {r['ms_per_generated_token']:6.2f} "
            f"{r['generated_tokens_per_s']:6.0f} {cells} {r['response_length_mean']:8.2f} {r['wall_s']:4.0f}s "
            f"{r['load_average_max']:5.1f}")
    lines += [
        "  (models: engines built (ours: from the manifest); procs: processes with one thread each; phase columns:",
        "   median seconds; TRL's score = its _generate_and_score_completions less generation (reference and reward",
        "   forwards, decoding, advantages); TRL's update = the rest of the step; wall: whole run with start-up)",
        "",
    ]
    names = {"ours_grpo_over_trl_grpo": "our GRPO / TRL GRPOTrainer", "ours_grpo_over_ours_gae": "our GRPO / our PPO (gae)",
             "ours_grpo@2_over_ours_gae": "our GRPO@2 / our PPO (gae)"}
    for key, c in result["comparison"].items():
        procs = c.get("processes", [])
        lines.append(f"  {names[key]:<28} {c['ratio']:.2f}x (target <= {c['target']}x): {'met' if c['met'] else 'NOT met'}"
                     f"   (fastest steps: {c['ratio_of_fastest_steps']:.2f}x; processes {procs[0]} vs {procs[1]})")
    busy = [n for n, r in result["rows"].items() if r["load_average_max"] > base.CPU_CORES + 0.5]
    if busy:
        lines.append(f"  WARNING: load above {base.CPU_CORES} cores during {', '.join(busy)}: other processes shared "
                     "the cores and those times are inflated")
    return "\n".join(lines)


def main(estimators: list[str], out: Path, workdir: str | None, steps: int, warmup: int, repeats: int = 1,
         trl: bool = True, shape: tuple[int, int, int] = (PROMPTS, SAMPLES, NEW_TOKENS)) -> dict:
    import platform

    sys.path.insert(0, str(ROOT))
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-estimators-"))
    root.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()
    order = ([TRL_ROW] if trl else []) + list(estimators)
    runs: dict[str, list[dict]] = {name: [] for name in order}
    try:
        print(f"[bench] building the setting in {root}", flush=True)
        setting = base.build_setting(root)
        for i in range(repeats):
            tag = f"-{i + 1}" if repeats > 1 else ""
            for name in order:
                print(f"[bench] {name}{tag}: {steps} steps", flush=True)
                r = (run_trl(setting, root, steps, warmup, shape, tag) if name == TRL_ROW
                     else run_ours(setting, root, name, steps, warmup, shape, tag))
                runs[name].append(r)
                print(f"[bench] {name}{tag}: {r['step_s_median']:.3f} s/step (load {r['load_average_max']:.1f})",
                      flush=True)
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    import deepspeed
    import torch
    import transformers
    import trl as trl_package

    rows = {name: combine(rs) for name, rs in runs.items()}
    prompts, samples, new_tokens = shape
    result = {
        "setting": {**{("prompts_available" if k == "prompts" else k): v for k, v in setting.items() if k != "paths"},
                    "prompts_per_step": prompts, "samples_per_prompt": samples, "new_tokens": new_tokens,
                    "kl_coef": KL_COEF, "steps": steps, "warmup": warmup, "repeats": repeats, "dtype": "fp32",
                    "device": "cpu", "deepspeed": "1 rank, zero0", "omp_num_threads": 1, "cpu_cores": base.CPU_CORES},
        "rows": rows,
        "comparison": compare(rows),
        "targets": {"ours_grpo_over_trl_grpo": TARGET_OVER_TRL, "ours_grpo_over_ours_gae": TARGET_OVER_GAE},
        "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.perf_counter() - started,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                        "trl": trl_package.__version__, "os_cpu_count": os.cpu_count()},
    }
    print()
    print(report(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[bench] result: {out}")
    return result
