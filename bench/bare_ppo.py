"""The ceiling for `ppo_step.py --sizes`: the same PPO step in one process, plain PyTorch + transformers.

    python bench/bare_ppo.py --policy DIR --reward DIR --prompts FILE [--steps 6] [--warmup 1]
                             [--threads 2] [--out result.json]

No DeepSpeed, no Trainer, no value process, no framework code of ours: the models load with
`AutoModelFor*.from_pretrained` and the step is written out below. Each step does what one PPO
step of the stage does on one rank (see stages/ppo/trainer.py), with the same sizes:

  1. rollout     KV-cache sampling of `--new-tokens` tokens for `--rollout` left-padded prompts
                 (one cached forward per token, inverse-CDF sampling; EOS held off to the end, as
                 `ppo.min_new_tokens = max_new_tokens` does in the bench's config)
  2. score       no-grad forwards: actor and reference log-probs, critic values at every response
                 position, reward model score at the last token
  3. advantages  per-token KL penalty, score at the last token, GAE (gamma 1, lambda 0.95), whitening
  4. update      `--epochs` passes of one minibatch: actor forward, clipped policy loss, backward,
                 gradient clip 1.0, AdamW; then the critic's forward, clipped value loss, backward,
                 clip, AdamW (one after the other, in this process)

It prints one JSON object (and writes it to --out): per-step phase times, their medians over the
steps after --warmup, generated tokens/s and the process's peak resident set.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PHASES = ("rollout", "score", "advantages", "update")


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def sample(model, ids, mask, new_tokens: int, eos: int, generator) -> torch.Tensor:
    with torch.inference_mode():
        out = _sample(model, ids, mask, new_tokens, eos, generator)
    return out.clone()  # a normal tensor: the update's forward keeps it for backward


def _sample(model, ids, mask, new_tokens: int, eos: int, generator) -> torch.Tensor:
    from transformers import DynamicCache

    batch, width = ids.shape
    attention = torch.cat([mask, torch.ones((batch, new_tokens), dtype=mask.dtype)], 1)
    pos = positions(mask)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    out = torch.empty((batch, new_tokens), dtype=torch.long)
    for t in range(new_tokens):
        logits = logits.float()
        logits[:, eos] = float("-inf")
        cdf = logits.softmax(-1).cumsum(-1)
        u = 1.0 - torch.rand((batch, 1), generator=generator)
        token = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)
        out[:, t] = token
        if t == new_tokens - 1:
            break
        logits = model(input_ids=token[:, None], attention_mask=attention[:, : width + t + 1],
                       position_ids=pos[:, -1:] + 1 + t, past_key_values=cache, use_cache=True).logits[:, -1]
    return out


def full_inputs(ids, mask, responses):
    seq = torch.cat([ids, responses], 1)
    attn = torch.cat([mask, torch.ones_like(responses)], 1)
    return seq, attn, positions(attn)


def response_logprobs(model, ids, mask, responses) -> torch.Tensor:
    seq, attn, pos = full_inputs(ids, mask, responses)
    # the LM head only where a response token is predicted (the last T+1 positions)
    logits = model(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False,
                   logits_to_keep=responses.shape[1] + 1).logits
    logits = logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, responses[..., None]).squeeze(-1)


def token_values(classifier, ids, mask, responses) -> torch.Tensor:
    """The classifier's one output at every position before each response token. [B, T]"""
    seq, attn, pos = full_inputs(ids, mask, responses)
    backbone = getattr(classifier, classifier.base_model_prefix)
    hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    return classifier.score(hidden[:, ids.shape[1] - 1 : -1]).squeeze(-1).float()


@torch.no_grad()
def last_score(classifier, ids, mask, responses) -> torch.Tensor:
    seq, attn, pos = full_inputs(ids, mask, responses)
    backbone = getattr(classifier, classifier.base_model_prefix)
    hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    return classifier.score(hidden[:, -1]).squeeze(-1).float()


def gae(rewards, values, gamma: float = 1.0, lam: float = 0.95):
    last, adv = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * nxt - values[:, t] + gamma * lam * last
        adv.append(last)
    adv = torch.stack(adv[::-1], 1)
    return adv, adv + values


def optimizer(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def train_step(model, opt, loss):
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL with a `prompt` field")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rollout", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-prompt-length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.policy)
    actor = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval().requires_grad_(False)
    critic = AutoModelForSequenceClassification.from_pretrained(args.reward, dtype=torch.float32).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, dtype=torch.float32).eval()
    reward.requires_grad_(False)
    actor_opt, critic_opt = optimizer(actor, 3e-4), optimizer(critic, 1e-4)

    rows = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in rows]
    prompt_ids = [x[-args.max_prompt_length:] for x in tok(texts, add_special_tokens=False)["input_ids"]]
    generator = torch.Generator().manual_seed(0)
    kl_coef, clip, clip_v = 0.05, 0.2, 0.2

    steps = []
    for step in range(args.steps):
        times = {}
        batch = prompt_ids[step * args.rollout : (step + 1) * args.rollout]
        t0 = time.perf_counter()
        ids, mask = left_pad(batch, tok.pad_token_id)
        responses = sample(actor, ids, mask, args.new_tokens, tok.eos_token_id, generator)
        times["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            old_lp = response_logprobs(actor, ids, mask, responses)
            ref_lp = response_logprobs(reference, ids, mask, responses)
            old_values = token_values(critic, ids, mask, responses)
            score = last_score(reward, ids, mask, responses)
        times["score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards = -kl_coef * (old_lp - ref_lp)
        rewards[:, -1] += score
        adv, returns = gae(rewards, old_values)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        times["advantages"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for _ in range(args.epochs):  # one minibatch of the whole rollout per epoch, as in the bench's setting
            lp = response_logprobs(actor, ids, mask, responses)
            ratio = (lp - old_lp).exp()
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
            train_step(actor, actor_opt, pg)
            v = token_values(critic, ids, mask, responses)
            v_clipped = old_values + (v - old_values).clamp(-clip_v, clip_v)
            vf = 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2).mean()
            train_step(critic, critic_opt, vf)
        times["update"] = time.perf_counter() - t0
        times["step"] = sum(times.values())
        times["tokens"] = responses.numel()
        steps.append(times)

    kept = steps[args.warmup:]
    med = {p: statistics.median(s[p] for s in kept) for p in (*PHASES, "step")}
    result = {
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
        "step_s_median": med["step"],
        "phase_s_median": {p: med[p] for p in PHASES},
        "phase_share_median": {p: statistics.median(s[p] / s["step"] for s in kept) for p in PHASES},
        "generated_tokens_per_s_step": statistics.median(s["tokens"] / s["step"] for s in kept),
        "generated_tokens_per_s_rollout": statistics.median(s["tokens"] / s["rollout"] for s in kept),
        "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in actor.parameters()),
        "per_step": steps,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
