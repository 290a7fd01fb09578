"""Did alignment work? Generate from each policy on held-out prompts and judge the responses.

Every policy samples with the same settings and the same seed. Responses are scored by an
independent judge (VADER for the demo, or a user's reward model / `module:callable`) and,
when given, by the trained reward model. Reward-hacking guards (real words, distinct bigrams)
and the KL to the reference are reported beside the judge, so a policy that wins by emitting
"great great great" shows up as hacking, not success. Used by the PPO stage and `rlhf eval`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import judging
from pipeline.generation import encode_prompts, left_pad, response_mask, sample

Judge = Callable[[list[str], list[str]], list[float]]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
             seed: int, max_prompt_length: int = 256, batch_size: int = 32, device: str = "cpu",
             min_new_tokens: int = 0):
    """Responses for `prompts`: (texts, [(prompt_ids, prompt_mask, responses, mask)] per batch)."""
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length)
    generator = torch.Generator(device=device).manual_seed(seed)  # multinomial needs it on the model's device
    texts, batches = [], []
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id, device)
        responses = sample(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, generator=generator,
                           min_new_tokens=min_new_tokens)
        rmask = response_mask(responses, tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(responses * rmask.long() + tokenizer.pad_token_id * (1 - rmask.long()),
                                        skip_special_tokens=True)
        batches.append((ids, mask, responses, rmask))
    return [t.strip() for t in texts], batches


@torch.no_grad()
def response_logprob_sums(model, batches, temperature: float) -> torch.Tensor:
    """Sum of the response tokens' log-probs under `model` (at the sampling temperature): [N]."""
    from stages.ppo.experience import Rollout, response_logits
    from stages.ppo.maths import logprobs_from_logits, masked_sum

    sums = []
    for ids, mask, responses, rmask in batches:
        r = Rollout(ids, mask, responses, rmask, (responses == -1).any(-1))
        logprobs = logprobs_from_logits(response_logits(model, r) / temperature, responses)
        sums.append(masked_sum(logprobs, rmask, dim=1))
    return torch.cat(sums)


@torch.no_grad()
def reward_model_scores(path: str, tokenizer, batches) -> list[float]:
    from pipeline.models import load_model
    from stages.ppo.engines import TokenValueModel
    from stages.ppo.experience import Rollout, last_token_scores

    model = TokenValueModel(load_model(path, kind="seq_cls", what="reward model")).to(batches[0][0].device).eval()
    out = []
    for ids, mask, responses, rmask in batches:
        out += last_token_scores(model, Rollout(ids, mask, responses, rmask, rmask[:, 0] > 0)).tolist()
    return out


def make_judge(spec: str, tokenizer) -> Judge:
    """`vader`, `module:callable`, or a reward-model checkpoint dir used as the judge."""
    if spec != "vader" and ":" not in spec and Path(spec).is_dir():
        def rm_judge(prompts: list[str], responses: list[str]) -> list[float]:
            ids = encode_prompts(tokenizer, prompts, 256)
            full = [p + tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                    for p, r in zip(ids, responses)]
            batches = []
            for i, (p, f) in enumerate(zip(ids, full)):
                pi, pm = left_pad([p], tokenizer.pad_token_id)
                resp = torch.tensor([f[len(p):]])
                batches.append((pi, pm, resp, torch.ones_like(resp, dtype=torch.float)))
            return reward_model_scores(spec, tokenizer, batches)
        return rm_judge
    return judging.load_judge(spec)


def eval_settings(cfg, n_prompts: int, baseline: str = "sft") -> dict[str, Any]:
    """How a config's evaluation samples and judges (`eval` section; response lengths from `ppo`), as
    results.json records it: the PPO stage and `rlhf eval` both evaluate with exactly these."""
    return {"judge": cfg.eval.judge, "prompts": cfg.eval.prompts or cfg.ppo.data.eval, "n_prompts": n_prompts,
            "seed": cfg.eval.seed,
            "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
            "max_new_tokens": cfg.eval.max_new_tokens or cfg.ppo.max_new_tokens,
            "min_new_tokens": cfg.ppo.min_new_tokens, "baseline": baseline}


def evaluate_policies(
    policies: dict[str, str],
    *,
    reference: str,
    prompts: list[str],
    settings: dict[str, Any],
    reward_model: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Generate, judge and compare each policy (name -> checkpoint dir) on the same prompts, sampling and
    judging as `settings` (from `eval_settings`) say."""
    from pipeline.models import load_model, load_tokenizer

    assert settings["n_prompts"] == len(prompts), (settings["n_prompts"], len(prompts))
    max_new_tokens, min_new_tokens = settings["max_new_tokens"], settings["min_new_tokens"]
    temperature, top_p, seed, baseline = settings["temperature"], settings["top_p"], settings["seed"], settings["baseline"]
    tokenizer = load_tokenizer(reference, what="eval reference")
    judge = make_judge(settings["judge"], tokenizer)
    ref_model = load_model(reference, what="eval reference").to(device).eval()
    results: dict[str, Any] = {"policies": {}, "win_rates": {}, "guards": {}, "samples": {}, "settings": dict(settings)}
    judged: dict[str, list[float]] = {}
    for name, path in policies.items():
        model = ref_model if Path(path) == Path(reference) else load_model(path, what=f"eval policy {name}").to(device).eval()
        texts, batches = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed, device=device, min_new_tokens=min_new_tokens)
        lengths = [int(m.sum()) for _, _, _, rm in batches for m in rm]
        judged[name] = [float(x) for x in judge(prompts, texts)]
        summary = judging.summarize_policy(prompts, texts, judged[name], lengths)
        kl = response_logprob_sums(model, batches, temperature) - response_logprob_sums(ref_model, batches, temperature)
        summary["kl_to_reference"] = float(kl.mean())
        if reward_model:
            rm = reward_model_scores(reward_model, tokenizer, batches)
            summary["reward_model_mean"] = sum(rm) / len(rm)
        results["policies"][name] = summary
        results["samples"][name] = [{"prompt": p, "response": t, "judge": j}
                                    for p, t, j in list(zip(prompts, texts, judged[name]))[:8]]
    if baseline in judged:
        for name in judged:
            if name != baseline:
                results["win_rates"][name] = judging.win_rate(judged[name], judged[baseline])
                results["guards"][name] = judging.guard_checks(results["policies"][name], results["policies"][baseline])
    return results


def format_table(results: dict[str, Any]) -> str:
    """A terminal table: one row per policy."""
    cols = ["judge_mean", "judge_stderr", "reward_model_mean", "win_rate", "kl_to_reference", "mean_length",
            "distinct_1", "distinct_2", "real_word_share"]
    lines = [f"{'policy':10s}" + "".join(f"{c:>18s}" for c in cols)]
    for name, s in results["policies"].items():
        row = dict(s, win_rate=results["win_rates"].get(name, {}).get("win_rate", float("nan")))
        lines.append(f"{name:10s}" + "".join(f"{row.get(c, float('nan')):>18.4f}" for c in cols))
    for name, guards in results.get("guards", {}).items():
        wr = results["win_rates"][name]
        lines.append(f"{name} vs {results['settings']['baseline']}: wins {wr['wins']:.3f}, ties {wr['ties']:.3f}, "
                     f"losses {wr['losses']:.3f}; guards: " + ", ".join(f"{k}={v}" for k, v in guards.items()))
    return "\n".join(lines)


def eval_prompts(cfg, data_dir: Path) -> list[str] | None:
    """The held-out prompts: `eval.prompts`, else `ppo.data.eval`; None when neither is set."""
    from pipeline.config import DataSection
    from pipeline.data import load_rows

    source = cfg.eval.prompts or cfg.ppo.data.eval
    if source is None:
        return None
    rows = load_rows(DataSection(train=source, columns=cfg.ppo.data.columns), split="train", fields=["prompt"],
                     data_dir=data_dir, what="eval.prompts")
    return list(rows["prompt"])[: cfg.eval.num_prompts]


def headline(results: dict[str, Any], policy: str = "ppo") -> dict[str, float]:
    """Flat numbers for a manifest's metrics: judge means, win rate, guards of `policy` vs baseline."""
    base = results["settings"]["baseline"]
    p, b = results["policies"][policy], results["policies"][base]
    out = {
        f"judge_mean_{base}": b["judge_mean"], f"judge_mean_{policy}": p["judge_mean"],
        "judge_win_rate": results["win_rates"][policy]["win_rate"],
        "judge_tie_rate": results["win_rates"][policy]["ties"],
        "eval_kl_to_reference": p["kl_to_reference"],
        f"mean_length_{base}": b["mean_length"], f"mean_length_{policy}": p["mean_length"],
        f"real_word_share_{base}": b["real_word_share"], f"real_word_share_{policy}": p["real_word_share"],
        f"distinct_2_{base}": b["distinct_2"], f"distinct_2_{policy}": p["distinct_2"],
    }
    if "reward_model_mean" in p:
        out[f"reward_model_mean_{base}"], out[f"reward_model_mean_{policy}"] = b["reward_model_mean"], p["reward_model_mean"]
    return out
