"""Did alignment work? The one evaluation: used by the PPO stage, `rlhf eval` and the end of `rlhf run`.

Each policy (name -> checkpoint) samples on the same held-out prompts with the same seed, at the
configured temperature and, by default, at T=1.0 too. An independent judge scores the responses
(VADER for the demo, a gold reward model, or a `module:callable`), the run's reward model scores
them beside it, and every policy is compared with the baseline (SFT): paired win rate and the
reward-hacking guards of `guards.py`. The verdict counts a win only when the policy is ahead at
every temperature and no guard fired; otherwise it says `reward hacking suspected: <guards>`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline import movie_reviews
from pipeline.config import DataSection, PipelineConfig
from pipeline.evaluation import guards
from pipeline.evaluation.judges import build_judge, mean_and_stderr, win_rate
from pipeline.schemas import Prompt, answer_text, prompt_text

BASELINE = "sft"
PLAIN_TEMPERATURE = 1.0
SIGNIFICANCE = 0.05  # a policy is ahead at a temperature only if its wins over losses are this unlikely by chance
SAMPLES_KEPT = 10  # responses per policy and temperature kept in results.json, the same prompts for all
FLUENCY_TEXT_FIELDS = ("text", "completion", "chosen", "messages")  # the first one a row has is read


def prompt_source(cfg: PipelineConfig) -> str | None:
    return cfg.eval.prompts or cfg.ppo.data.eval


def fluency_source(cfg: PipelineConfig) -> str | None:
    return cfg.eval.fluency_text or cfg.sft.data.eval


def temperatures(cfg: PipelineConfig) -> list[float]:
    plain = [PLAIN_TEMPERATURE] if cfg.eval.plain_sampling and cfg.eval.temperature != PLAIN_TEMPERATURE else []
    return [cfg.eval.temperature, *plain]


def eval_settings(cfg: PipelineConfig, n_prompts: int, baseline: str = BASELINE) -> dict[str, Any]:
    """How a config's evaluation samples and judges, as results.json records it: the PPO stage and
    `rlhf eval` both evaluate with exactly these (response lengths come from the `ppo` section)."""
    return {"judge": cfg.eval.judge, "prompts": prompt_source(cfg), "n_prompts": n_prompts, "seed": cfg.eval.seed,
            "temperatures": temperatures(cfg), "top_p": cfg.eval.top_p,
            "max_new_tokens": cfg.eval.max_new_tokens or cfg.ppo.max_new_tokens,
            "min_new_tokens": cfg.ppo.min_new_tokens, "baseline": baseline,
            "kl_budget": cfg.eval.kl_budget, "fluency_text": fluency_source(cfg),
            "trust_remote_code": cfg.run.trust_remote_code}


def _demo_data(cfg: PipelineConfig, source: str | None, data_dir: Path) -> None:
    """Write the embedded demo's splits when `source` names one (an old run dir may predate a split)."""
    if source and source.startswith(movie_reviews.PREFIX):
        movie_reviews.prepare(cfg.movie_reviews, data_dir / "movie-reviews")


def load_prompts(cfg: PipelineConfig, data_dir: Path) -> list[Prompt] | None:
    """The held-out prompts, in any PPO prompt format: `eval.prompts`, else `ppo.data.eval`, read from a hub
    set or dataset folder's `ppo.data.eval_split` (never the training split); the first `eval.num_prompts`;
    None when neither is set."""
    from pipeline.data import load_stage_rows

    source = prompt_source(cfg)
    if source is None:
        return None
    _demo_data(cfg, source, data_dir)
    declared = cfg.ppo.data.format if source == cfg.ppo.data.eval else "auto"
    data = DataSection(eval=source, eval_split=cfg.ppo.data.eval_split, columns=cfg.ppo.data.columns, format=declared)
    rows = load_stage_rows(data, "ppo", split="eval", data_dir=data_dir, what="eval.prompts").rows
    return list(rows["prompt"])[: cfg.eval.num_prompts]


def load_fluency_model(cfg: PipelineConfig, data_dir: Path) -> guards.NgramLM | None:
    """The fluency guard's bigram model, fitted now on `eval.fluency_text` (else sft.data.eval)."""
    from pipeline.data import load_rows
    from pipeline.errors import DataError

    source = fluency_source(cfg)
    if source is None:
        return None
    _demo_data(cfg, source, data_dir)
    rows = load_rows(DataSection(train=source, split=cfg.sft.data.eval_split), split="train", fields=[],
                     optional_fields=FLUENCY_TEXT_FIELDS, data_dir=data_dir, what="eval.fluency_text")
    field = next((f for f in FLUENCY_TEXT_FIELDS if f in rows.column_names), None)
    if field is None:
        raise DataError(f"eval.fluency_text: {source}: no field among {', '.join(FLUENCY_TEXT_FIELDS)}")
    return guards.NgramLM(text for text in map(answer_text, rows[field]) if text)


def policy_summary(responses: list[str], judge_scores: list[float], token_lengths: list[int],
                   fluency_lm: guards.NgramLM | None) -> dict[str, Any]:
    """One policy's numbers at one temperature: judge mean and stderr, length in tokens, guard measures."""
    judge_mean, judge_stderr = mean_and_stderr(judge_scores)
    return {"judge_mean": judge_mean, "judge_stderr": judge_stderr,
            "mean_length": sum(token_lengths) / len(token_lengths), **guards.text_measures(responses, fluency_lm),
            "n": len(responses)}


def evaluate_policies(policies: dict[str, str], *, reference: str, prompts: list[Prompt], settings: dict[str, Any],
                      fluency_lm: guards.NgramLM | None = None, reward_model: str | None = None,
                      device: str = "cpu") -> dict[str, Any]:
    """Generate, judge and compare each policy (name -> checkpoint dir) on the same prompts, at every
    temperature of `settings` (from `eval_settings`); the verdict per policy against the baseline."""
    from pipeline.evaluation.sampling import RewardModelScorer, generate, response_logprob_sums
    from pipeline.models import load_model, load_tokenizer

    assert settings["n_prompts"] == len(prompts), (settings["n_prompts"], len(prompts))
    baseline = settings["baseline"]
    trust = settings.get("trust_remote_code", False)
    tokenizer = load_tokenizer(reference, what="eval reference", trust_remote_code=trust)
    judge = build_judge(settings["judge"], device, trust_remote_code=trust)
    reward_scorer = RewardModelScorer(reward_model, device, trust_remote_code=trust) if reward_model else None
    ref_model = load_model(reference, what="eval reference", trust_remote_code=trust).to(device).eval()
    models = {name: ref_model if Path(path) == Path(reference) else
              load_model(path, what=f"eval policy {name}", trust_remote_code=trust).to(device).eval()
              for name, path in policies.items()}
    limits = guards.GuardLimits(kl_budget=settings["kl_budget"])
    kept = sorted(random.Random(settings["seed"]).sample(range(len(prompts)), min(SAMPLES_KEPT, len(prompts))))
    results: dict[str, Any] = {"settings": dict(settings), "temperatures": {}}
    for temperature in settings["temperatures"]:
        block: dict[str, Any] = {"policies": {}, "win_rates": {}, "guards": {}, "samples": {}}
        judged: dict[str, list[float]] = {}
        for name, model in models.items():
            texts, batches = generate(model, tokenizer, prompts, max_new_tokens=settings["max_new_tokens"],
                                      temperature=temperature, top_p=settings["top_p"], seed=settings["seed"],
                                      device=device, min_new_tokens=settings["min_new_tokens"])
            lengths = [int(m.sum()) for r in batches for m in r.mask]
            judged[name] = [float(x) for x in judge(prompts, texts)]
            summary = policy_summary(texts, judged[name], lengths, fluency_lm)
            # the reference itself is 0 by definition: do not run the same forwards twice to subtract them
            summary["kl_to_reference"] = 0.0 if model is ref_model else float(
                (response_logprob_sums(model, batches, temperature)
                 - response_logprob_sums(ref_model, batches, temperature)).mean())
            if reward_scorer is not None:
                summary["reward_model_mean"] = mean_and_stderr(reward_scorer(prompts, texts))[0]
            block["policies"][name] = summary
            block["samples"][name] = [{"prompt": prompt_text(prompts[i]), "response": texts[i], "judge": judged[name][i]} for i in kept]
        if baseline in judged:
            for name in judged:
                if name != baseline:
                    block["win_rates"][name] = win_rate(judged[name], judged[baseline])
                    block["guards"][name] = guards.guard_checks(block["policies"][name], block["policies"][baseline],
                                                                limits)
        results["temperatures"][temperature_key(temperature)] = block
    results["verdicts"] = {name: verdict(results, name) for name in policies if name != baseline and baseline in policies}
    return results


def temperature_key(temperature: float) -> str:
    return f"{temperature:g}"


def is_ahead(wr: dict[str, float]) -> bool:
    """More wins than losses, and more than chance would give: one-sided sign test below SIGNIFICANCE."""
    return wr["wins"] > wr["losses"] and wr["sign_test_p"] < SIGNIFICANCE


def verdict(results: dict[str, Any], name: str) -> dict[str, Any]:
    """Win only when significantly ahead of the baseline (`is_ahead`) at every temperature with no guard
    fired; otherwise say which guards fired at which temperature, or where it was not ahead."""
    base = results["settings"]["baseline"]
    blocks = results["temperatures"]
    ahead = [t for t, b in blocks.items() if is_ahead(b["win_rates"][name])]
    fired: dict[str, list[str]] = {}
    for t, b in blocks.items():
        for guard in guards.suspected(b["guards"][name]):
            fired.setdefault(guard, []).append(t)
    unmeasured = sorted({g for b in blocks.values() for g in ("fluency_nll", "kl_budget")
                         if f"{g}_ok" not in b["guards"][name]})
    if fired:
        line = f"{name} vs {base}: reward hacking suspected: " + ", ".join(
            f"{g} (T={'/'.join(ts)})" for g, ts in fired.items())
    elif len(ahead) == len(blocks):
        line = f"{name} vs {base}: win at " + " and ".join(
            f"T={t} ({b['win_rates'][name]['win_rate']:.3f})" for t, b in blocks.items()) + "; no guard fired"
    else:
        behind = "; ".join(f"T={t}: wins {b['win_rates'][name]['wins']:.3f}, losses {b['win_rates'][name]['losses']:.3f}, "
                           f"sign test p={b['win_rates'][name]['sign_test_p']:.2g}"
                           for t, b in blocks.items() if t not in ahead)
        where = f"ahead at T={'/'.join(ahead)} only" if ahead else "not ahead at any temperature"
        line = f"{name} vs {base}: no win: {where} ({behind})"
    if unmeasured:
        line += f" (not measured: {', '.join(unmeasured)})"
    return {"win": not fired and len(ahead) == len(blocks), "hacking_suspected": list(fired), "ahead_at": ahead,
            "line": line}


# Column title -> summary key; short titles keep one row per policy on a terminal line.
TABLE_COLUMNS = {"judge": "judge_mean", "stderr": "judge_stderr", "rm": "reward_model_mean", "win": "win_rate",
                 "kl": "kl_to_reference", "len": "mean_length", "nll": "fluency_nll", "rep2": "rep_2",
                 "rep3": "rep_3", "top2": "top_bigram_share", "real": "real_word_share", "dist2": "distinct_2"}


def format_table(results: dict[str, Any]) -> str:
    """The terminal table: per temperature one row per policy, each comparison's line, then the verdicts."""
    base = results["settings"]["baseline"]
    lines = []
    for t, block in results["temperatures"].items():
        lines.append(f"T={t:<8s}" + "".join(f"{c:>9s}" for c in TABLE_COLUMNS))
        for name, s in block["policies"].items():
            row = dict(s, win_rate=block["win_rates"].get(name, {}).get("win_rate", float("nan")))
            lines.append(f"{name:10s}" + "".join(f"{row.get(k, float('nan')):>9.3f}" for k in TABLE_COLUMNS.values()))
        for name, wr in block["win_rates"].items():
            p, b = block["policies"][name], block["policies"][base]
            failed = guards.suspected(block["guards"][name])
            lines.append(f"  {name} vs {base}: wins {wr['wins']:.3f}, ties {wr['ties']:.3f}, losses {wr['losses']:.3f} "
                         f"(sign test p={wr['sign_test_p']:.2g}); "
                         f"top bigram \"{p['top_bigram']}\" {p['top_bigram_share']:.2f} ({base}: \"{b['top_bigram']}\" "
                         f"{b['top_bigram_share']:.2f}); guards failed: {', '.join(failed) or 'none'}")
    lines += [v["line"] for v in results.get("verdicts", {}).values()]
    return "\n".join(lines)


def headline(results: dict[str, Any], policy: str = "ppo") -> dict[str, Any]:
    """Flat numbers for a manifest's metrics: per temperature the judge means, win rate, KL and guard
    measures of `policy` and the baseline; then the verdict."""
    base = results["settings"]["baseline"]
    out: dict[str, Any] = {}
    for i, (t, block) in enumerate(results["temperatures"].items()):
        suffix = "" if i == 0 else f"_t{t}"  # the configured temperature keeps the plain names
        p, b = block["policies"][policy], block["policies"][base]
        out[f"judge_win_rate{suffix}"] = block["win_rates"][policy]["win_rate"]
        out[f"judge_tie_rate{suffix}"] = block["win_rates"][policy]["ties"]
        out[f"judge_sign_test_p{suffix}"] = block["win_rates"][policy]["sign_test_p"]
        out[f"eval_kl_to_reference{suffix}"] = p["kl_to_reference"]
        for key in ("judge_mean", "reward_model_mean", "mean_length", "fluency_nll", "rep_2", "rep_3",
                    "top_bigram_share", "real_word_share", "distinct_2"):
            if key in p:
                out[f"{key}_{base}{suffix}"], out[f"{key}_{policy}{suffix}"] = b[key], p[key]
    v = results["verdicts"][policy]
    out["eval_win"] = v["win"]
    out["reward_hacking_suspected"] = v["hacking_suspected"]
    out["eval_verdict"] = v["line"]
    return out
