"""Benchmark: ZeRO-3 generation speed, weights gathered once per batch vs DeepSpeed's per-token fetch.

    python bench/zero3_generation.py                                 # GPU: ~0.56B Llama, bf16
    python bench/zero3_generation.py --device cpu --layers 2 --hidden 64 --heads 4 --vocab 512 \
        --batch 4 --prompt-len 8 --new-tokens 8 --ppo-steps 1 --out /tmp/z3.json   # CPU smoke check

It builds a Llama-style causal LM from a config (random init, nothing downloaded), one rank, and
times generating `--new-tokens` tokens for `--batch` prompts of `--prompt-len` random tokens:

  plain_sampler          the model without DeepSpeed: our sampler (`pipeline.generation.sample`); the ceiling
  zero3_gather_once      our PPO rollout path: `gathered_module(engine)` + our sampler (the time
                         includes the one gather; `gather_s` reports it alone)
  zero3_hooks_per_block  our sampler on the engine's module with ZeRO-3 hooks active, decoder blocks
                         as ZeRO-3 leaf modules (what our PPO engines set up): one fetch per block per token
  zero3_hooks_default    the same with DeepSpeed's default hooks, one fetch per submodule per token
                         (what a loop that calls the hooked module gets, as peers' rollouts do)
  hf_generate_zero3_hooks  `module.generate` on the default-hooked engine module
  hf_generate_plain      `generate` on the plain model

Every ZeRO-3 engine is a stage-3 inference engine made from our `zero3` preset the way the PPO stage
makes its frozen engines (`ds_config.inference_config`); bf16 when the GPU supports it, else fp32.
One rank still partitions and hooks. With `--ppo-steps N` it then runs N PPO steps of the real
phases (`stages.ppo.experience` rollout/score/advantages, clipped policy and value updates) on four
ZeRO-3 engines built by `stages.ppo.engines._engine`, to show a bf16 step runs end to end.

The table gives tokens/s (batch x generated width / median seconds), each path's speed relative to
the gather-once path, peak GPU memory (`torch.cuda.max_memory_allocated`) and how much of each
sampler path's tokens equal the plain model's under the same sampling seed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATHS = ("plain_sampler", "zero3_gather_once", "zero3_hooks_per_block", "zero3_hooks_default",
         "hf_generate_zero3_hooks", "hf_generate_plain")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width; default 8/3 x hidden rounded up to 128")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path after one warm-up")
    p.add_argument("--path-budget-s", type=float, default=90.0, help="stop repeating a path once it has used this long")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    p.add_argument("--ppo-steps", type=int, default=0, help="then run this many PPO steps on ZeRO-3 engines (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "zero3_generation.json"))
    args = p.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        p.error(f"unknown path(s) {', '.join(sorted(unknown))}; choices: {', '.join(PATHS)}")
    return args


def ppo_parts(names=("engines", "experience", "maths", "update")):
    """stages.ppo's __init__ imports the whole stage (data loaders and their text packages); load the parts only."""
    if "stages.ppo" not in sys.modules:
        import stages

        pkg = types.ModuleType("stages.ppo")
        pkg.__path__ = [str(ROOT / "stages" / "ppo")]
        sys.modules["stages.ppo"] = pkg
        stages.ppo = pkg
    return tuple(importlib.import_module(f"stages.ppo.{m}") for m in names)


def init_distributed(device: str) -> None:
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def llama_config(args):
    from transformers import LlamaConfig

    inter = args.intermediate or -(-(8 * args.hidden // 3) // 128) * 128
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=args.prompt_len + args.new_tokens + 8,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def memory(device) -> dict[str, float | None]:
    import torch

    if device.type != "cuda":
        return {"allocated_mib": None, "peak_mib": None}
    mib = 2**20
    return {"allocated_mib": torch.cuda.memory_allocated() / mib, "peak_mib": torch.cuda.max_memory_allocated() / mib}


def zero3_engine(model, ds, whole_blocks: bool):
    """A frozen ZeRO-3 engine as the PPO stage makes one; `whole_blocks=False` keeps DeepSpeed's default hooks."""
    import deepspeed

    engines, *_ = ppo_parts()
    if whole_blocks:
        return engines._engine(model, ds)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    return engine


def run_path(name, generate, args, device) -> dict:
    """One warm-up, then up to `repeats` timed runs (fewer once the path has used its budget)."""
    import torch

    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resting = memory(device)["allocated_mib"]
    start = time.perf_counter()
    tokens, _ = generate()
    seconds, gathers = [], []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        out, gather_s = generate()
        sync(device)
        seconds.append(time.perf_counter() - t0)
        gathers.append(gather_s)
        if time.perf_counter() - start > args.path_budget_s:
            break
    median = statistics.median(seconds)
    width = out.shape[1]
    result = {
        "path": name, "runs_s": seconds, "median_s": median, "new_tokens_per_row": width,
        "tokens_per_s": args.batch * width / median, "ms_per_token_step": 1000 * median / width,
        "gather_s": statistics.median(gathers) if gathers[0] is not None else None,
        "resting_mib": resting, "peak_mib": memory(device)["peak_mib"], "first_tokens": tokens,
    }
    print(f"{name:24s} {result['tokens_per_s']:10.1f} tok/s  {result['ms_per_token_step']:8.2f} ms/step  "
          f"median {median:.3f}s over {len(seconds)}", flush=True)
    return result


def ppo_check(args, cfg, device, dtype, base_state) -> dict:
    """`--ppo-steps` PPO steps on four ZeRO-3 engines: rollout, score, advantages, one epoch of updates."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline import ds_config
    from pipeline.config import PPOSection

    engines, xp, maths, ppo_update, value_process = ppo_parts(("engines", "experience", "maths", "update",
                                                                "value_process"))
    section = PPOSection(rollout_batch_size=args.batch, minibatch_size=max(1, args.batch // 2), ppo_epochs=1,
                         max_new_tokens=args.new_tokens, lr=1e-6)
    train_ds = ds_config.resolve("zero3", micro_batch=section.minibatch_size, grad_accum=1, world_size=1,
                                 max_grad_norm=1.0)
    frozen_ds = ds_config.inference_config(train_ds, args.batch, 1)

    def lm():
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        model.load_state_dict(base_state)
        return model

    def value_model():
        torch.manual_seed(args.seed + 1)
        value_cfg = copy.deepcopy(cfg)
        value_cfg.num_labels = 1
        return engines.TokenValueModel(LlamaForSequenceClassification(value_cfg).to(device=device, dtype=dtype))

    actor = lm()
    actor.config.use_cache = False
    models = types.SimpleNamespace(
        actor=engines._engine(actor, train_ds, section.lr, 0.0),
        critic=engines._engine(value_model(), train_ds, section.critic_lr, 0.0),
        reference=engines._engine(lm(), frozen_ds),
        reward=engines._engine(value_model(), frozen_ds),
    )
    tokenizer = types.SimpleNamespace(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    steps = []
    for step in range(args.ppo_steps):
        ids = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), device=device, generator=generator)
        mask = torch.ones_like(ids)
        times = {}

        def phase(name, fn):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times[name] = time.perf_counter() - t0
            return out

        r = phase("rollout", lambda: xp.rollout(models.actor, ids, mask, section, tokenizer, generator))
        scores = phase("score", lambda: xp.score(models, value_process.InProcess(models), r, section.temperature))
        logprobs, ref_logprobs, values = scores.logprobs, scores.ref_logprobs, scores.values
        advantages = phase("advantages", lambda: xp.advantages(scores, scores.raw_scores, r, section, section.kl_coef))
        kl, adv, returns = advantages.kl, advantages.advantages, advantages.returns

        def update():
            losses = []
            order = torch.randperm(args.batch, device=device, generator=generator)
            for start in range(0, args.batch, section.minibatch_size):
                idx = order[start : start + section.minibatch_size]
                mb = xp.Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.responses[idx], r.mask[idx], r.ended[idx])
                # the stage's own update steps (under ZeRO-3: gathered whole when within the live budget)
                actor, _ = ppo_update.actor_update(models, mb, logprobs[idx], adv[idx], section, ref_logprobs[idx],
                                                   section.kl_coef)
                critic = ppo_update.critic_update(models, mb, values[idx], returns[idx], section.clip_range_value)
                losses.append((actor["policy_loss"], critic["value_loss"]))
            return losses

        losses = phase("update", update)
        finite = all(torch.isfinite(torch.tensor(pair)).all() for pair in losses)
        steps.append({"step": step, "phase_s": times, "step_s": sum(times.values()), "losses": losses,
                      "finite": bool(finite), "response_width": r.responses.shape[1],
                      "mean_kl": float(maths.masked_mean(kl, r.mask))})
        print(f"ppo step {step}: " + "  ".join(f"{k} {v:.3f}s" for k, v in times.items())
              + f"  losses {losses}", flush=True)
    return {"settings": {"rollout_batch_size": section.rollout_batch_size, "minibatch_size": section.minibatch_size,
                         "ppo_epochs": 1, "max_new_tokens": section.max_new_tokens, "deepspeed": train_ds},
            "steps": steps, "peak_mib": memory(device)["peak_mib"], "ok": all(s["finite"] for s in steps)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from pipeline import ds_config
    from pipeline.generation import sample
    from pipeline.zero3 import gathered_module

    init_distributed(args.device)
    import deepspeed

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ds = ds_config.inference_config(ds_config.resolve("zero3", micro_batch=args.batch, grad_accum=1, world_size=1,
                                                      max_grad_norm=None), args.batch, 1)
    dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32

    cfg = llama_config(args)
    torch.manual_seed(args.seed)
    plain = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in plain.parameters())
    base_state = {k: v.detach().clone() for k, v in plain.state_dict().items()} if args.ppo_steps else None
    wanted = set(args.paths.split(","))
    # same weights everywhere: each engine partitions its own copy of the plain model
    blocks = default = None
    if wanted & {"zero3_gather_once", "zero3_hooks_per_block"}:
        blocks = zero3_engine(copy.deepcopy(plain), ds, whole_blocks=True)
    if wanted & {"zero3_hooks_default", "hf_generate_zero3_hooks"}:
        default = zero3_engine(copy.deepcopy(plain), ds, whole_blocks=False)
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})"
    print(f"{n_params / 1e6:.1f}M parameters, {dtype}, {where}", flush=True)

    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    prompt_ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), device=device, generator=gen)
    prompt_mask = torch.ones_like(prompt_ids)
    kw = dict(max_new_tokens=args.new_tokens, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)

    def seeded():
        return torch.Generator(device=device).manual_seed(args.seed)

    def ours(model):
        def run():
            return sample(model, prompt_ids, prompt_mask, generator=seeded(), **kw), None
        return run

    def gather_once():
        t0 = time.perf_counter()
        with gathered_module(blocks) as model:
            sync(device)
            gather_s = time.perf_counter() - t0
            return sample(model, prompt_ids, prompt_mask, generator=seeded(), **kw), gather_s

    def hf(model):
        def run():
            torch.manual_seed(args.seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id, top_k=0)
            return out[:, args.prompt_len:], None
        return run

    makers = {
        "plain_sampler": lambda: ours(plain),
        "zero3_gather_once": lambda: gather_once,
        "zero3_hooks_per_block": lambda: ours(blocks.module),
        "zero3_hooks_default": lambda: ours(default.module),
        "hf_generate_zero3_hooks": lambda: hf(default.module),
        "hf_generate_plain": lambda: hf(plain),
    }
    results = {name: run_path(name, makers[name](), args, device) for name in PATHS if name in wanted}

    reference = results.get("plain_sampler", {}).get("first_tokens")
    ours_speed = results.get("zero3_gather_once", {}).get("tokens_per_s")
    for name, res in results.items():
        tokens = res.pop("first_tokens")
        res["speed_vs_gather_once"] = res["tokens_per_s"] / ours_speed if ours_speed else None
        same_shape = reference is not None and name.startswith("zero3") and tokens.shape == reference.shape
        res["tokens_equal_to_plain"] = float((tokens == reference).float().mean()) if same_shape else None

    ppo = ppo_check(args, cfg, device, dtype, base_state) if args.ppo_steps else None
    report = {
        "benchmark": "zero3_generation",
        "device": where,
        "settings": {
            "model": "LlamaForCausalLM from config, random init", "parameters": n_params, "layers": args.layers,
            "hidden": args.hidden, "heads": args.heads, "intermediate": cfg.intermediate_size, "vocab": args.vocab,
            "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "sampling": "temperature 1, top_p 1 (ours); do_sample, top_k 0 (generate)",
            "repeats": args.repeats, "world_size": 1, "deepspeed_config": ds,
        },
        "results": results,
        "gather_once_vs_plain": (ours_speed / results["plain_sampler"]["tokens_per_s"]
                                 if ours_speed and "plain_sampler" in results else None),
        "ppo_step": ppo,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
                     "trl": importlib.import_module("trl").__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
