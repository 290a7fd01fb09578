"""TRL's GRPOTrainer on the bench's tiny setting, one process on CPU: seconds per step, phase by phase.

    python bench/trl_grpo.py --policy DIR --reward DIR --prompts FILE [--steps 30] [--warmup 5]
                             [--prompts-per-step 4] [--samples 4] [--new-tokens 16] [--beta 0.05]
                             [--threads 1] [--out result.json]

The other side of `ppo_step.py --estimators` (bench/estimators.py), run in its own process so its
thread count and imports are its own. The policy and reward model are the bench's, loaded from disk
(nothing from the hub), in fp32. The trainer is configured to do the work our GRPO step does:

  - `--prompts-per-step` prompts x `--samples` generations (`num_generations`) of exactly `--new-tokens`
    tokens (`max_completion_length`, and `min_new_tokens` through `generation_kwargs`), temperature 1,
    plain `model.generate` (no vLLM, no continuous batching);
  - one optimizer step per generation batch: `per_device_train_batch_size` = prompts x samples,
    `gradient_accumulation_steps` = `steps_per_generation` = `num_iterations` = 1;
  - the reward is our reward model on the very ids our stage scores (the prompt's chat-template ids
    followed by the sampled completion ids), as a reward function in `reward_funcs`. TRL's own path for a
    sequence-classification model in `reward_funcs` decodes each completion to text and re-tokenises
    prompt + completion through the chat template: on this tiny BPE, 16 random tokens come back as ~25
    (up to 34) and the sequence overflows the reward model's 64 positions, and it would score more tokens
    than our side does;
  - `beta` > 0 loads the reference model and adds the k3 KL term to the loss, as our `ppo.kl_in: loss`;
  - fp32 (`bf16` and `fp16` off), no gradient checkpointing, dropout off (our loop runs the actor in
    eval mode), no logging backends, no checkpoints.

A step is timed from the trainer's `on_step_begin` to `on_step_end` callback: generation, scoring,
the loss's forward and backward, gradient clipping and the optimizer step. Inside it:
  rollout  `_generate_single_turn` (tokenised prompts in, completion ids out: `model.generate`)
  score    the rest of `_generate_and_score_completions` (decoding, reference log-probs, the reward
           model, group-normalised advantages, TRL's metrics)
  update   the rest of the step (the policy forward with the loss, backward, clip, AdamW)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


def timed(name: str, seconds: dict):
    """Wrap a bound method so each call adds its wall time to seconds[name]."""
    def wrap(method):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        return call
    return wrap


def reward_on_ids(reward_model, tokenizer):
    """A TRL reward function: the reward model's output at the last token of prompt ids + completion ids."""
    import torch

    prompt_ids: dict[str, list[int]] = {}

    def reward_model_score(prompts, completions, completion_ids, **kwargs) -> list[float]:
        rows = []
        for messages, completion in zip(prompts, completion_ids):
            key = json.dumps(messages)
            if key not in prompt_ids:
                rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
                prompt_ids[key] = list(rendered["input_ids"])
            rows.append(prompt_ids[key] + list(completion))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        with torch.inference_mode():
            return reward_model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()

    return reward_model_score


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL rows with a `prompt` string")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="num_generations")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient; > 0 builds the reference model")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward, dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    # one user turn each, as our stage renders a string prompt (pipeline.generation.encode_prompts)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])

    per_step: list[dict] = []
    phase: dict[str, float] = {}
    tokens: dict[str, int] = {}

    class StepClock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            phase.clear()
            tokens.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            step_s = time.perf_counter() - self.t0
            gen_score = phase.get("generate_and_score", 0.0)
            per_step.append({
                "step": state.global_step, "time/step_s": step_s,
                "time/rollout_s": phase.get("rollout", 0.0),
                "time/score_s": gen_score - phase.get("rollout", 0.0),
                "time/update_s": step_s - gen_score,
                "time/reward_model_s": phase.get("reward", 0.0),
                "completion_tokens": tokens.get("completion", 0), "prompt_tokens": tokens.get("prompt", 0),
                "completions": tokens.get("completions", 0),
            })

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            return timed("generate_and_score", phase)(super()._generate_and_score_completions)(inputs)

        def _generate_single_turn(self, prompt_ids, *a, **k):
            completion_ids, logprobs = timed("rollout", phase)(super()._generate_single_turn)(prompt_ids, *a, **k)
            tokens["prompt"] = tokens.get("prompt", 0) + sum(map(len, prompt_ids))
            tokens["completion"] = tokens.get("completion", 0) + sum(map(len, completion_ids))
            tokens["completions"] = tokens.get("completions", 0) + len(completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *a, **k):
            return timed("reward", phase)(super()._calculate_rewards)(*a, **k)

    batch = args.prompts_per_step * args.samples
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, max_steps=args.steps, seed=0, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, disable_dropout=True, report_to=[], save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
            learning_rate=args.lr, lr_scheduler_type="cosine", max_grad_norm=1.0,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
            num_iterations=1, num_generations=args.samples, max_completion_length=args.new_tokens,
            generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
            beta=args.beta, model_init_kwargs={"dtype": torch.float32}, use_vllm=False,
        )
        trainer = TimedGRPOTrainer(model=args.policy, reward_funcs=reward_on_ids(reward_model.eval(), tokenizer),
                                   args=config, train_dataset=dataset, processing_class=tokenizer,
                                   callbacks=[StepClock()])
        dtypes = sorted({str(p.dtype) for p in trainer.model.parameters()})
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started

    kept = [r for r in per_step if r["step"] > args.warmup]
    if not kept:
        raise SystemExit(f"only {len(per_step)} steps ran; need more than --warmup {args.warmup}")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in kept)

    phases = ("rollout", "score", "update")
    result = {
        "trl": trl.__version__, "torch_threads": torch.get_num_threads(), "dtypes": dtypes,
        "reference_model": trainer.ref_model is not None, "beta": args.beta, "loss_type": config.loss_type,
        "optimizer": str(getattr(config.optim, "value", config.optim)),
        "prompts_per_step": args.prompts_per_step, "samples_per_prompt": args.samples,
        "new_tokens": args.new_tokens, "steps": len(per_step), "warmup": args.warmup, "steps_measured": len(kept),
        "step_s_median": med("time/step_s"), "step_s_min": min(r["time/step_s"] for r in kept),
        "step_s_max": max(r["time/step_s"] for r in kept),
        "phase_s_median": {p: med(f"time/{p}_s") for p in phases},
        "phase_share_median": {p: statistics.median(r[f"time/{p}_s"] / r["time/step_s"] for r in kept)
                               for p in phases},
        "reward_model_s_median": med("time/reward_model_s"),
        "completions_per_step": med("completions"),
        "completion_tokens_per_step": med("completion_tokens"),
        "response_length_mean": statistics.mean(r["completion_tokens"] / r["completions"] for r in kept),
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] / r["completions"] for r in kept),
        "train_s": train_s, "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "per_step": per_step,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
