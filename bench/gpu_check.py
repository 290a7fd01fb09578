"""One prepared GPU check: rollout speed four ways, the memory-bandwidth bound, update MFU, memory per engine.

    bash bench/gpu_check.sh [--out bench/results/gpu_check.json]      # one GPU, bf16, under 8 minutes
    bash bench/gpu_check.sh --smoke --out /tmp/g.json                 # CPU, fp32, tiny shapes, seconds

Nothing is downloaded: the models are random-init `Qwen2ForCausalLM` shaped like Qwen2.5-0.5B and
Qwen2.5-1.5B (`Qwen2Config` + `from_config`), bf16 on the GPU; `--smoke` uses one tiny Qwen2 shape
in fp32 on CPU through the same code. One rank (RANK/WORLD_SIZE/MASTER_* set here when missing).

Per model:
  rollout (tokens/s, `--batch` prompts of `--prompt-len` random tokens, `--new-tokens` new tokens, all
  rows run to full length):
    ours_gathered       `pipeline.zero3.gathered_module(engine)` + `pipeline.generation.sample`: the actor
                        gathered once under ZeRO-3 (the gather is inside the time), as the PPO rollout does
    deepspeed_fetch     our sampler on the ZeRO-3 engine's module with DeepSpeed's hooks on: a fetch and a
                        release per submodule per token (what a loop without our gather gets)
    hf_generate         `generate(do_sample=True, top_k=0)` on the plain bf16 model
    plain_sampler       our sampler on the plain model (no DeepSpeed at all)
    bandwidth_bound     batch x bandwidth / weight bytes: each new token reads every weight once
  update: the four PPO engines as the stage builds them on ZeRO-3 (`stages.ppo.engines._engine`), one
    rollout, scoring, advantages, then the stage's own `actor_update` on a minibatch; MFU =
    6 x parameters x tokens / seconds / peak bf16 FLOP/s (tokens = minibatch x (prompt + response))
  memory per engine: parameters + optimizer state this rank holds (`pipeline.sharding.local_sizes`), the
    device memory the engine added when built, and the device's peak while that engine worked (on CPU:
    the process's peak resident set, shared by all engines)

The device's bandwidth and peak bf16 FLOP/s come from a small table of data-sheet figures by device
name (H200, H100 SXM/PCIe, A100 80/40 GB); on any other device (and on CPU) from a measurement made
here (a large copy; a large matmul), and the JSON says which.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# data-sheet figures: (name substring, memory bandwidth bytes/s, dense bf16 FLOP/s)
DEVICES = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100", 1.555e12, 312e12),  # 40 GB
]

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B and -1.5B), random init
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
ROLLOUT_PATHS = ("ours_gathered", "deepspeed_fetch", "hf_generate", "plain_sampler")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, one tiny shape, a few tokens: seconds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    p.add_argument("--models", default=None, help="comma-separated of " + ", ".join(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="rollout prompts (default 64; smoke 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; smoke 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 128; smoke 6)")
    p.add_argument("--minibatch", type=int, default=None, help="update minibatch (default 16; smoke 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement after one warm-up")
    p.add_argument("--path-budget-s", type=float, default=40.0, help="no further repeats once a path used this long")
    args = p.parse_args(argv)
    smoke = args.smoke
    for name, full, tiny in (("batch", 64, 4), ("prompt_len", 128, 8), ("new_tokens", 128, 6), ("minibatch", 16, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    args.models = (args.models or ("smoke" if smoke else "qwen2.5-0.5b,qwen2.5-1.5b")).split(",")
    unknown = set(args.models) - set(SHAPES)
    if unknown:
        p.error(f"--models: unknown {', '.join(sorted(unknown))}; choices: {', '.join(SHAPES)}")
    if args.batch % args.minibatch:
        p.error("--minibatch must divide --batch")
    return args


# ---------------------------------------------------------------- setup


def init_rank(device: str) -> None:
    """One rank in this process, as the launcher would set it up."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "MASTER_PORT" not in os.environ:
        from pipeline.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    from pipeline.worker import init_distributed

    init_distributed()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def device_figures(device) -> dict:
    """Bandwidth and peak bf16 FLOP/s: the data-sheet table by device name, else measured here."""
    import torch

    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # measured: a copy of 1 GiB (32 MiB on CPU), read + write; a square matmul
    n = (2**30 if device.type == "cuda" else 2**25) // 4
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    measured_bw = 2 * n * 4 / min(times)
    del x, y
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    measured_flops = 2 * m**3 / min(times)
    del a, b
    row = next((r for r in DEVICES if device.type == "cuda" and r[0].lower() in name.lower()), None)
    return {
        "name": name,
        "bandwidth_bytes_per_s": row[1] if row else measured_bw,
        "bandwidth_source": f"data sheet ({row[0]})" if row else "measured (copy)",
        "peak_flops": row[2] if row else measured_flops,
        "peak_flops_source": f"data sheet dense bf16 ({row[0]})" if row else f"measured ({str(dtype)[6:]} matmul {m})",
        "measured_bandwidth_bytes_per_s": measured_bw,
        "measured_matmul_flops": measured_flops,
    }


def memory_now(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device, repeats: int, budget_s: float) -> tuple[float, object]:
    """One warm-up, then up to `repeats` timed calls; the median seconds and the last result."""
    start = time.perf_counter()
    out = fn()
    seconds = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(seconds), out


# ---------------------------------------------------------------- one model


def check_model(name: str, args, device, dtype, figures: dict) -> dict:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

    from pipeline import ds_config
    from pipeline.config import PPOSection
    from pipeline.generation import sample
    from pipeline.sharding import local_sizes
    from pipeline.zero3 import gathered_module

    from zero3_generation import ppo_parts  # bench/ is on the path: this script's own folder

    engines, xp, ppo_update = ppo_parts(("engines", "experience", "update"))
    t_model = time.perf_counter()
    config = Qwen2Config(**SHAPES[name], max_position_embeddings=max(512, args.prompt_len + args.new_tokens),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True)
    print(f"[gpu_check] {name}: building", flush=True)

    def causal_lm(seed: int):
        torch.manual_seed(seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    def value_model(seed: int):
        torch.manual_seed(seed)
        cfg = copy.deepcopy(config)
        cfg.num_labels = 1
        with torch.device(device):
            return engines.TokenValueModel(AutoModelForSequenceClassification.from_config(cfg, dtype=dtype))

    plain = causal_lm(0).eval()
    n_params = sum(p.numel() for p in plain.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len), device=device, generator=gen)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_id=config.eos_token_id,
              pad_id=config.pad_token_id)

    section = PPOSection(rollout_batch_size=args.batch, minibatch_size=args.minibatch, ppo_epochs=1,
                         max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, lr=1e-6,
                         max_prompt_length=args.prompt_len)
    train_ds = ds_config.resolve("zero3", micro_batch=args.minibatch, grad_accum=1, world_size=1, max_grad_norm=1.0)
    frozen_ds = ds_config.inference_config(train_ds, args.batch, 1)

    # the four PPO engines, as the stage builds them; the memory each adds on the device as it is built
    built, added = {}, {}
    makers = {"actor": lambda: engines._engine(copy.deepcopy(plain).train(), train_ds, section.lr, 0.0),
              "critic": lambda: engines._engine(value_model(2), train_ds, section.critic_lr, 0.0),
              "reference": lambda: engines._engine(copy.deepcopy(plain), frozen_ds),
              "reward": lambda: engines._engine(value_model(3), frozen_ds)}
    for key, make in makers.items():
        sync(device)
        before = memory_now(device)
        built[key] = make()
        sync(device)
        added[key] = memory_now(device) - before
    built["actor"].module.config.use_cache = True
    models = engines.PPOModels(built["actor"], built["critic"], built["reference"], built["reward"], False)
    # DeepSpeed's own per-module fetch: a frozen ZeRO-3 engine with its default hooks (no leaf blocks)
    plain_copy = copy.deepcopy(plain).requires_grad_(False)
    fetch_engine, *_ = deepspeed.initialize(model=plain_copy, config=frozen_ds)
    build_s = time.perf_counter() - t_model

    def seeded():
        return torch.Generator(device=device).manual_seed(7)

    def hf_generate():
        torch.manual_seed(7)
        return plain.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                              max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=config.pad_token_id,
                              eos_token_id=config.eos_token_id)[:, args.prompt_len:]

    def ours_gathered():
        with gathered_module(models.actor) as module:
            return sample(module, ids, mask, generator=seeded(), **kw)

    paths = {
        "ours_gathered": ours_gathered,
        "deepspeed_fetch": lambda: sample(fetch_engine.module, ids, mask, generator=seeded(), **kw),
        "hf_generate": hf_generate,
        "plain_sampler": lambda: sample(plain, ids, mask, generator=seeded(), **kw),
    }
    rollout = {}
    for path in ROLLOUT_PATHS:
        reset_peak(device)
        seconds, out = timed(paths[path], device, args.repeats, args.path_budget_s)
        tokens = out.shape[0] * out.shape[1]
        rollout[path] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                         "ms_per_token_step": 1000 * seconds / out.shape[1], "peak_mib": peak(device)}
        print(f"[gpu_check] {name}: rollout {path:16s} {rollout[path]['tokens_per_s']:10.1f} tok/s", flush=True)
    bound = args.batch * figures["bandwidth_bytes_per_s"] / weight_bytes
    rollout["bandwidth_bound"] = {"tokens_per_s": bound, "weight_bytes": weight_bytes}
    for path in ROLLOUT_PATHS:
        rollout[path]["fraction_of_bound"] = rollout[path]["tokens_per_s"] / bound
    del fetch_engine, plain_copy

    # one PPO step's phases on the four engines; each engine's peak while it works
    engine_peak = {}
    reset_peak(device)
    generator = torch.Generator(device=device).manual_seed(11)
    r = xp.rollout(models.actor, ids, mask, section, types.SimpleNamespace(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id), generator)
    engine_peak["actor"] = peak(device)
    with torch.no_grad():
        reset_peak(device)
        logprobs, ref_logprobs = xp.policy_logprobs(models, r, section.temperature)
        engine_peak["reference"] = peak(device)  # actor + reference forwards, one after the other
        reset_peak(device)
        values, raw = xp.value_scores(models, r)
        engine_peak["reward"] = peak(device)  # critic + reward forwards
    advantages = xp.advantages(xp.Scores(logprobs, ref_logprobs, values, raw), raw, r, section, section.kl_coef)
    adv, returns = advantages.advantages, advantages.returns
    idx = torch.arange(args.minibatch, device=device)
    mb = xp.Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.responses[idx], r.mask[idx], r.ended[idx])
    reset_peak(device)
    actor_s, (stats, _) = timed(lambda: ppo_update.actor_update(models, mb, logprobs[idx], adv[idx], section,
                                                                ref_logprobs[idx], section.kl_coef),
                           device, args.repeats, args.path_budget_s)
    engine_peak["actor"] = max(engine_peak["actor"], peak(device))
    reset_peak(device)
    critic_s, _ = timed(lambda: ppo_update.critic_update(models, mb, values[idx], returns[idx],
                                                         section.clip_range_value),
                        device, args.repeats, args.path_budget_s)
    engine_peak["critic"] = peak(device)
    tokens = args.minibatch * (args.prompt_len + r.responses.shape[1])
    flops = 6 * n_params * tokens
    update = {
        "minibatch": args.minibatch, "tokens": tokens, "parameters": n_params,
        "actor_step_s": actor_s, "critic_step_s": critic_s,
        "actor_mfu": flops / actor_s / figures["peak_flops"],
        "critic_mfu": 6 * sum(getattr(p, "ds_numel", p.numel()) for p in models.critic.module.parameters())
        * tokens / critic_s / figures["peak_flops"],
        "actor_tflops": flops / actor_s / 1e12,
        "policy_loss": stats["policy_loss"],
    }
    print(f"[gpu_check] {name}: update actor {actor_s:.3f}s MFU {update['actor_mfu']:.1%}, critic {critic_s:.3f}s",
          flush=True)
    memory = {}
    for key, engine in built.items():
        sizes = local_sizes(engine)
        elem = 2 if dtype == torch.bfloat16 else 4
        memory[key] = {
            "params_mib": sizes["params_local"] * elem / 2**20,
            "optimizer_state_mib": sizes["optim_state_local"] * 4 / 2**20,
            "added_on_build_mib": added[key],
            "peak_mib": engine_peak.get(key, peak(device)),
        }
    out = {"shape": SHAPES[name], "parameters": n_params, "weight_bytes": weight_bytes, "build_s": build_s,
           "rollout": rollout, "update": update, "memory": memory}
    del models, built, plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- report


def table(result: dict) -> str:
    d = result["device"]
    s = result["settings"]
    lines = [
        f"GPU check on {d['name']} ({s['dtype']}, 1 rank, ZeRO-3 engines as the PPO stage builds them)",
        f"  bandwidth {d['bandwidth_bytes_per_s'] / 1e12:.3g} TB/s ({d['bandwidth_source']}); peak "
        f"{d['peak_flops'] / 1e12:.4g} TFLOP/s ({d['peak_flops_source']})",
        f"  rollout: {s['batch']} prompts x {s['prompt_len']} tokens, {s['new_tokens']} new tokens (all rows full "
        "length);"
        f" update: minibatch {s['minibatch']}",
        "",
        f"  {'model':<13} {'params':>8} {'ours gathered':>14} {'DS fetch':>9} {'HF gen':>9} {'plain':>9} "
        f"{'BW bound':>9} {'ours/bound':>10} {'actor MFU':>9} {'critic MFU':>10}",
    ]
    for name, m in result["models"].items():
        r, u = m["rollout"], m["update"]
        lines.append(
            f"  {name:<13} {m['parameters'] / 1e6:7.3g}M {r['ours_gathered']['tokens_per_s']:14.0f} "
            f"{r['deepspeed_fetch']['tokens_per_s']:9.0f} {r['hf_generate']['tokens_per_s']:9.0f} "
            f"{r['plain_sampler']['tokens_per_s']:9.0f} {r['bandwidth_bound']['tokens_per_s']:9.0f} "
            f"{r['ours_gathered']['fraction_of_bound']:10.1%} {u['actor_mfu']:9.1%} {u['critic_mfu']:10.1%}")
    lines += ["  (rollout columns: generated tokens/s; BW bound: batch x bandwidth / weight bytes)", "",
              f"  {'model':<13} {'engine':<10} {'params MiB':>10} {'optim MiB':>10} {'added MiB':>10} {'peak MiB':>10}"]
    for name, m in result["models"].items():
        for key, mem in m["memory"].items():
            lines.append(f"  {name:<13} {key:<10} {mem['params_mib']:10.1f} {mem['optimizer_state_mib']:10.1f} "
                         f"{mem['added_on_build_mib']:10.1f} {mem['peak_mib']:10.1f}")
    lines.append("  (added: device memory the engine added when built; peak: the device's peak while it worked"
                 + (", on CPU the process's peak resident set)" if result["settings"]["device"] == "cpu" else ")"))
    lines.append(f"  total {result['wall_s']:.0f}s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import warnings

    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    import torch

    use_cuda = torch.cuda.is_available() and not args.smoke
    init_rank("cuda" if use_cuda else "cpu")
    import deepspeed
    import transformers

    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if use_cuda else torch.float32
    figures = device_figures(device)
    print(f"[gpu_check] {figures['name']}: {figures['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s "
          f"({figures['bandwidth_source']}), {figures['peak_flops'] / 1e12:.1f} TFLOP/s "
          f"({figures['peak_flops_source']})",
          flush=True)
    models = {name: check_model(name, args, device, dtype, figures) for name in args.models}
    result = {
        "benchmark": "gpu_check", "smoke": args.smoke, "device": figures,
        "settings": {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "batch": args.batch,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "minibatch": args.minibatch,
                     "repeats": args.repeats, "world_size": 1, "zero_stage": 3},
        "models": models,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "deepspeed": deepspeed.__version__},
        "wall_s": time.perf_counter() - started,
    }
    print()
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[gpu_check] JSON written to {out.resolve()}", flush=True)
    return result


if __name__ == "__main__":
    main()
