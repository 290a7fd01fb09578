"""`ppo_step.py --sizes`: the same PPO step at three model sizes, against a bare-PyTorch ceiling.

    python bench/ppo_step.py --sizes [--only 130k,1.6M,25M] [--out bench/results/ppo_sizes.json]

Per size it builds a setting (tokenizer, policy, reward model = critic init, the same prompts), runs the
real stage through `rlhf run` as 1 rank ZeRO-0, 2 ranks ZeRO-2 and 2 ranks ZeRO-3, and runs
`bench/bare_ppo.py` (one process, plain torch + transformers) on the very same models and prompts.

The sizes:
  130k  the fixed setting of `ppo_step.py`: GPT-2 2 x 64, byte-level BPE of 400 tokens
  1.6M  configs/demo.yaml `pretrain.model` (Llama-style via `pipeline.models.build_model`),
        BPE of `pretrain.tokenizer_vocab_size` tokens
  25M   Llama-style 6 layers x 512 (8 heads, MLP 1792, tied), the demo's tokenizer

The step is the same at every size: 16 prompts (4-8 review words, with the chat template), 16 new
tokens at temperature 1 with EOS held off to the end (`ppo.min_new_tokens = 16`, so every response is
16 tokens whatever the random model prefers), 4 epochs of one minibatch of 16, fp32, OMP_NUM_THREADS=1
per rank. Few steps per size (see STEPS), the first dropped; medians over the rest.

Peak memory per rank: each process's peak resident set (VmHWM in /proc/PID/status), polled while the
run goes, grouped by the RANK in its environment (a rank's value process, which holds critic and
reward model, is listed on its own); the stage's manifest `metrics.peak_memory_mib` (rank 0) beside it.
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
RUNS = base.RUNS
NEW_TOKENS = base.NEW_TOKENS
# name -> (steps, warm-up steps dropped)
STEPS = {"130k": (10, 2), "1.6M": (6, 1), "25M": (4, 1)}
# The bare loop runs once per thread count (`--bare-threads`) and the fastest is the ceiling. One thread
# is what each of our processes gets; two would give its matmuls both cores (our 1-rank run uses both,
# through its value process), but OpenMP's spinning barriers make two threads far slower whenever other
# processes share the cores (130k: 13.5 s/step on 2 threads against 0.62 on 1, at load 8-10), so the
# default is 1.
BARE_THREADS = (1,)
TARGET_BARE = 1.25
TARGET_ZERO3 = base.TARGET_ZERO3_OVER_ZERO2


def demo_arch() -> tuple[dict, int]:
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["pretrain"]
    return dict(demo["model"]), int(demo.get("tokenizer_vocab_size", 4096))


def llama_setting(workdir: Path, arch: dict, vocab: int, seed: int = 0) -> dict:
    """Tokenizer of `vocab`, a Llama-style policy from `arch` and a one-output classifier of the same shape."""
    import torch
    from transformers import LlamaForSequenceClassification

    from pipeline.config import ModelArch
    from pipeline.generation import encode_prompts
    from pipeline.models import build_model, train_tokenizer
    from pipeline.movie_reviews import load_reviews

    reviews = load_reviews()
    tokenizer = train_tokenizer((r.text for r in reviews[:3000]), vocab)
    policy = build_model(ModelArch(**arch), tokenizer, seed)
    config = policy.config.__class__.from_dict(policy.config.to_dict())
    config.num_labels = 1
    torch.manual_seed(seed + 1)
    reward = LlamaForSequenceClassification(config)
    paths = {"policy": workdir / "policy", "reward": workdir / "reward", "prompts": workdir / "prompts.jsonl"}
    for model, key in ((policy, "policy"), (reward, "reward")):
        model.save_pretrained(str(paths[key]), safe_serialization=True)
        tokenizer.save_pretrained(str(paths[key]))
    prompts = base.make_prompts(reviews[3000:], 512, seed)
    paths["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    prompt_tokens = [len(x) for x in encode_prompts(tokenizer, prompts, 10**6)]
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
        "reward_parameters": sum(p.numel() for p in reward.parameters()),
        "vocab_size": len(tokenizer), "prompts": len(prompts),
        "prompt_tokens_mean": statistics.mean(prompt_tokens), "prompt_tokens_max": max(prompt_tokens),
    }


def build(name: str, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "130k":
        s = base.build_setting(workdir)
        return {**s, "model": "GPT-2 2 layers x 64, 4 heads (ppo_step.py's setting)"}
    arch, vocab = demo_arch()
    if name == "25M":
        arch = {**arch, "hidden_size": 512, "num_layers": 6, "num_heads": 8, "intermediate_size": 1792}
    s = llama_setting(workdir, arch, vocab)
    return {**s, "model": (f"Llama {arch['num_layers']} layers x {arch['hidden_size']}, {arch['num_heads']} heads, "
                           f"MLP {arch['intermediate_size']}" + (" (configs/demo.yaml)" if name == "1.6M" else ""))}


# ---------------------------------------------------------------- memory of the rank processes


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _process_info(pid: int) -> tuple[float, str] | None:
    """(peak resident set in MiB, label) of a process, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    if hwm is None:
        return None
    env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
    rank = env.get("RANK")
    if rank is None:
        label = "launcher"
    elif "multiprocessing" in cmdline:
        label = f"rank {rank} value process"
    else:
        label = f"rank {rank}"
    return int(hwm) / 1024, label


def run_stage(config_path: Path, run_dir: Path, ranks: int, preset: str, log_path: Path) -> dict:
    """`rlhf run` on CPU ranks, polling every process's peak resident set; wall, load, memory."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    cmd = base.rlhf_command() + ["run", str(config_path), "--run-dir", str(run_dir),
                                 f"deepspeed.num_gpus={ranks}", f"deepspeed.config={preset}"]
    peak: dict[int, tuple[float, str]] = {}

    def sample_memory(root: int) -> None:
        for pid in _descendants(root):
            info = _process_info(pid)
            if info is not None:
                peak[pid] = (max(info[0], peak.get(pid, (0.0, ""))[0]), info[1])

    wall, load = base.run_logged(cmd, env, log_path, while_running=sample_memory)
    memory: dict[str, float] = {}
    for mib, label in peak.values():
        memory[label] = max(memory.get(label, 0.0), mib)
    manifest = run_dir / "ppo" / "final" / "manifest.json"
    rank0 = None
    if manifest.exists():
        rank0 = json.loads(manifest.read_text()).get("metrics", {}).get("peak_memory_mib")
    return {"wall_s": wall, "load_average_max": load,
            "peak_rss_mib": dict(sorted(memory.items())), "manifest_peak_memory_mib_rank0": rank0}


def run_bare(setting: dict, steps: int, warmup: int, threads: int, log_path: Path) -> dict:
    paths = setting["paths"]
    out = log_path.with_suffix(".json")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(BENCH / "bare_ppo.py"), "--policy", paths["policy"], "--reward", paths["reward"],
           "--prompts", paths["prompts"], "--steps", str(steps), "--warmup", str(warmup),
           "--rollout", str(base.ROLLOUT), "--new-tokens", str(NEW_TOKENS), "--epochs", str(base.EPOCHS),
           "--max-prompt-length", str(base.N_POSITIONS - NEW_TOKENS), "--threads", str(threads),
           "--out", str(out)]
    wall, load = base.run_logged(cmd, env, log_path)
    return {**json.loads(out.read_text()), "wall_s": wall, "load_average_max": load}


# ---------------------------------------------------------------- one size


def run_size(name: str, workdir: Path, runs: list, bare_threads=BARE_THREADS) -> dict:
    steps, warmup = STEPS[name]
    t0 = time.perf_counter()
    print(f"[bench] {name}: building the setting in {workdir}", flush=True)
    setting = build(name, workdir)
    print(f"[bench] {name}: {setting['model']}, {setting['policy_parameters']:,} parameters, vocab "
          f"{setting['vocab_size']}", flush=True)
    config = base.ppo_config(setting, steps)
    config["ppo"]["min_new_tokens"] = NEW_TOKENS
    config_path = workdir / "ppo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = {"setting": {k: v for k, v in setting.items() if k != "paths"}, "steps": steps, "warmup": warmup,
              "runs": {}}
    for run, ranks, preset in runs:
        run_dir = workdir / "runs" / run
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[bench] {name}: {run} ({ranks} rank(s), {preset}, {steps} steps)", flush=True)
        info = run_stage(config_path, run_dir, ranks, preset, workdir / f"{run}.log")
        rows = base.read_metrics(run_dir / "ppo" / "metrics.jsonl", ranks)
        result["runs"][run] = {"ranks": ranks, "deepspeed": preset, **info, **base.summarise(rows, warmup),
                               "per_step": [{k: r[k] for k in ("step", "time/step_s",
                                                               *(f"time/{p}_s" for p in base.PHASES))}
                                            for r in rows]}
        print(f"[bench] {name}: {run} {result['runs'][run]['step_s_median']:.3f} s/step "
              f"(wall {info['wall_s']:.0f}s, load {info['load_average_max']:.1f})", flush=True)
    bare = {}
    for threads in bare_threads:
        print(f"[bench] {name}: bare loop ({steps} steps, {threads} thread(s))", flush=True)
        bare[threads] = run_bare(setting, steps, warmup, threads, workdir / f"bare{threads}.log")
        print(f"[bench] {name}: bare, {threads} thread(s): {bare[threads]['step_s_median']:.3f} s/step "
              f"(load {bare[threads]['load_average_max']:.1f})", flush=True)
    result["bare_by_threads"] = {str(t): b for t, b in bare.items()}
    result["bare"] = min(bare.values(), key=lambda b: b["step_s_median"])
    r = result["runs"]
    result["ratios"] = {
        "zero0_over_bare": r["1rank_zero0"]["step_s_median"] / result["bare"]["step_s_median"]
        if "1rank_zero0" in r else None,
        "zero3_over_zero2": r["2rank_zero3"]["step_s_median"] / r["2rank_zero2"]["step_s_median"]
        if {"2rank_zero2", "2rank_zero3"} <= set(r) else None,
    }
    result["wall_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- report


def _memory_cell(run: dict) -> str:
    mem = run["peak_rss_mib"]
    parts = [f"r{label.split()[1]}{'v' if 'value' in label else ''}:{mib:.0f}"
             for label, mib in mem.items() if label != "launcher"]
    return " ".join(parts)


def report(result: dict) -> str:
    lines = [
        "PPO step at three sizes (CPU ranks, fp32; OMP_NUM_THREADS=1 per rank; bare loop: 1 process, "
        f"{' or '.join(map(str, result['bare_threads']))} thread(s))",
        f"  per step: {base.ROLLOUT} prompts (4-8 words + chat template), {NEW_TOKENS} new tokens (EOS held off: "
        f"min_new_tokens={NEW_TOKENS}), {base.EPOCHS} epochs x 1 minibatch of {base.MINIBATCH}, temperature 1",
        "  medians over the steps after the warm-up; step = rollout + score + advantages + update",
        "",
        f"  {'size':<5} {'params':>11} {'run':<12} {'steps':>5} {'s/step':>7} {'tok/s':>6} {'rollout':>7} "
        f"{'score':>6} {'adv':>4} {'update':>6} {'peak RSS MiB per process':<32} {'wall':>5} {'load':>5}",
    ]
    for name, size in result["sizes"].items():
        params = size["setting"]["policy_parameters"]
        rows = [(run, r) for run, r in size["runs"].items()] + [
            (f"bare {t}thr" + ("*" if b is size["bare"] or b == size["bare"] else ""), b)
            for t, b in size["bare_by_threads"].items()]
        for run, r in rows:
            sh = r["phase_share_median"]
            mem = _memory_cell(r) if not run.startswith("bare") else f"bare:{r['peak_memory_mib']:.0f}"
            steps = f"{size['steps'] - size['warmup']}"
            lines.append(
                f"  {name:<5} {params:>11,} {run:<12} {steps:>5} {r['step_s_median']:7.3f} "
                f"{r['generated_tokens_per_s_step']:6.0f} {sh['rollout']:7.0%} {sh['score']:6.0%} "
                f"{sh['advantages']:4.0%} {sh['update']:6.0%} {mem:<32} {r['wall_s']:4.0f}s "
                f"{r['load_average_max']:5.1f}")
    lines += [
        "  (steps: steps measured; tok/s: generated tokens per second of whole step, all ranks; peak RSS: VmHWM of",
        "   each process, rN = rank N, rNv = rank N's value process (critic + reward model); load: highest 1-minute",
        "   load average seen during the run; bare Nthr: the bare loop on N threads, * the faster, used as the",
        "   ceiling)",
        "",
        f"  {'size':<5} {'1 rank ZeRO-0 / bare':>21} {'target':>7} {'ZeRO-3 / ZeRO-2':>16} {'target':>7}",
    ]
    for name, size in result["sizes"].items():
        q = size["ratios"]
        bare = "-" if q["zero0_over_bare"] is None else f"{q['zero0_over_bare']:.2f}x"
        z = "-" if q["zero3_over_zero2"] is None else f"{q['zero3_over_zero2']:.2f}x"
        bare_ok = "" if q["zero0_over_bare"] is None else ("met" if q["zero0_over_bare"] <= TARGET_BARE else "NOT met")
        z_ok = "" if q["zero3_over_zero2"] is None else ("met" if q["zero3_over_zero2"] <= TARGET_ZERO3 else "NOT met")
        lines.append(f"  {name:<5} {bare:>21} {bare_ok:>7} {z:>16} {z_ok:>7}")
    lines.append(f"  (targets: <= {TARGET_BARE}x the bare loop, ZeRO-3/ZeRO-2 <= {TARGET_ZERO3}x; "
                 f"whole --sizes run {result['wall_s'] / 60:.1f} min)")
    busy = [f"{n}/{run}" for n, size in result["sizes"].items() for run, r in
            [*size["runs"].items(), *size["bare_by_threads"].items()] if r["load_average_max"] > base.CPU_CORES + 0.5]
    if busy:
        lines.append(f"  WARNING: load above {base.CPU_CORES} cores during {', '.join(busy)}: other processes "
                     "shared the cores and those times are inflated")
    return "\n".join(lines)


def main(only: list[str], out: Path, workdir: str | None, runs: list, bare_threads=BARE_THREADS) -> dict:
    import platform

    sys.path.insert(0, str(ROOT))
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-sizes-"))
    started = time.perf_counter()
    result = {"sizes": {}, "bare_threads": list(bare_threads), "load_average_start": os.getloadavg()}
    try:
        for name in only:
            result["sizes"][name] = run_size(name, root / name, runs, bare_threads)
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    import deepspeed
    import torch
    import transformers

    result["wall_s"] = time.perf_counter() - started
    result["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                             "os_cpu_count": os.cpu_count(), "load_average_end": os.getloadavg()}
    print()
    print(report(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[bench] result: {out}")
    return result
