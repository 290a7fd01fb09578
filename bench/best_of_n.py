"""What the reward model allows at all: best-of-n from the SFT policy, judged as the evaluation judges.

For each evaluation prompt, the run's SFT policy samples n responses (seeds eval.seed+1 ... eval.seed+n)
and the run's reward model picks the one it scores highest; the judge then compares that pick with
SFT's own evaluation sample (eval.seed, the very response `rlhf eval` compares PPO with). Best-of-n
stays inside SFT's support and spends at most log n - (n-1)/n nats of KL to it (Beirami et al. 2024,
"Theoretical guarantees on the best-of-n alignment policy"), so its win rate at that KL is what a
policy optimising this reward model can reach without exploiting it. The judge's own best-of-n is the
ceiling with a perfect reward model. The run's PPO policy (its eval/results.json, when the prompts
and seed match) is printed beside them at each temperature:

    python bench/best_of_n.py RUN_DIR [--prompts movie-reviews:heldout_prompts] [--n 64] [--out FILE.json]

`--pickers DIR,DIR` has more reward models pick from the same candidates, and the mean of their scores;
`--bag-of-words [PAIRS]` the probe of bench/reward_probe.py, fitted on the run's reward_train pairs (or
PAIRS). Each picker's agreement with the judge on candidate pairs is printed beside its best-of-n wins.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluation.judges import win_rate  # noqa: E402


def best_of_n_kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || base) in nats: log n - (n - 1) / n (0 for n = 1)."""
    if n < 1:
        raise ValueError(f"best_of_n_kl_bound: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_picks(picker_scores: list[list[float]], n: int) -> list[int]:
    """For each prompt, the index (among the first n candidates) the picker scores highest; the first on a tie.

    `picker_scores[k][i]` is candidate k's score on prompt i."""
    if not 1 <= n <= len(picker_scores):
        raise ValueError(f"best_of_n_picks: n={n} but {len(picker_scores)} candidates")
    return [max(range(n), key=lambda k: (picker_scores[k][i], -k)) for i in range(len(picker_scores[0]))]


def best_of_n_win(picker_scores: list[list[float]], judge_scores: list[list[float]], baseline: list[float],
                  n: int) -> dict[str, float]:
    """The judge's paired comparison (`win_rate`) of the picker's best-of-n against the baseline responses."""
    picks = best_of_n_picks(picker_scores, n)
    return win_rate([judge_scores[k][i] for i, k in enumerate(picks)], baseline)


def frontier(rm: list[list[float]], judge: list[list[float]], baseline: list[float]) -> list[dict[str, float]]:
    """One row per n = 1, 2, 4, ... up to the candidates there are: KL bound, win by reward model, win by judge."""
    rows, n = [], 1
    while n <= len(rm):
        rows.append({"n": n, "kl_bound": best_of_n_kl_bound(n),
                     "rm_pick": best_of_n_win(rm, judge, baseline, n),
                     "judge_pick": best_of_n_win(judge, judge, baseline, n)})
        n *= 2
    return rows


def judge_agreement(picker_scores: list[list[float]], judge_scores: list[list[float]]) -> float:
    """Among candidate pairs for the same prompt that the judge tells apart, the share the picker orders the same way
    (a tie in the picker's scores counts half)."""
    agree = total = 0.0
    for i in range(len(picker_scores[0])):
        for a in range(len(picker_scores)):
            for b in range(a + 1, len(picker_scores)):
                jd = judge_scores[a][i] - judge_scores[b][i]
                if jd == 0:
                    continue
                pd = picker_scores[a][i] - picker_scores[b][i]
                agree += 0.5 if pd == 0 else float((pd > 0) == (jd > 0))
                total += 1
    return agree / total if total else float("nan")


def _ppo_point(rd, settings: dict, temperature_key: str) -> dict | None:
    """The run's own PPO evaluation at this temperature, if it judged the same prompts with the same seed."""
    path = rd.root / "eval" / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    same = all(results["settings"].get(k) == settings[k] for k in ("prompts", "n_prompts", "seed", "judge"))
    block = results["temperatures"].get(temperature_key) if same else None
    if not block or "ppo" not in block["win_rates"]:
        return None
    return {"win_rate": block["win_rates"]["ppo"]["win_rate"], "kl": block["policies"]["ppo"]["kl_to_reference"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--prompts", help="prompt source (default: the run config's eval prompts)")
    parser.add_argument("--num-prompts", type=int)
    parser.add_argument("--n", type=int, default=64, help="candidates per prompt (largest n shown)")
    parser.add_argument("--pickers", help="more reward-model dirs, comma-separated: each picks too, and so does "
                                          "the mean of their scores")
    parser.add_argument("--bag-of-words", nargs="?", const="", metavar="PAIRS_JSONL",
                        help="the bag-of-words probe picks too, fitted on these preference pairs (default: the "
                             "run's data/movie-reviews/reward_train.jsonl)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)

    from pipeline.evaluation.evaluate import eval_settings, temperature_key
    from pipeline.evaluation.judges import build_judge
    from pipeline.evaluation.rundir import held_out_prompts, optimised_reward_model
    from pipeline.evaluation.sampling import RewardModelScorer, generate
    from pipeline.models import load_model, load_tokenizer
    from pipeline.rundir import load_run_config, require_run_dir

    rd = require_run_dir(Path(args.run_dir))
    cfg = load_run_config(rd)
    prompts = held_out_prompts(cfg, rd, args.num_prompts, args.prompts)
    settings = eval_settings(cfg, len(prompts))
    sft = str(rd.final_dir("sft"))
    trust = settings["trust_remote_code"]
    tokenizer, policy = load_tokenizer(sft, trust_remote_code=trust), load_model(sft, trust_remote_code=trust).eval()
    reward = RewardModelScorer(optimised_reward_model(cfg, rd), trust_remote_code=trust)
    judge = build_judge(settings["judge"], trust_remote_code=trust)
    dirs = args.pickers.split(",") if args.pickers else []
    names = [Path(d).name for d in dirs]  # a picker is named by its folder, or its whole path when two folders share it
    others = {(name if names.count(name) == 1 else d): RewardModelScorer(d, trust_remote_code=trust)
              for name, d in zip(names, dirs)}
    models = list(others)  # the reward models among the pickers: their mean picks too
    if args.bag_of_words is not None:
        from bench.reward_probe import fit_probe, probe_scores

        pairs = Path(args.bag_of_words or rd.root / "data" / "movie-reviews" / "reward_train.jsonl")
        rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
        vocab, weights = fit_probe(rows)
        others["bag-of-words"] = lambda _prompts, texts: probe_scores(texts, vocab, weights)

    def sample(temperature: float, seed: int) -> list[str]:
        return generate(policy, tokenizer, prompts, max_new_tokens=settings["max_new_tokens"], temperature=temperature,
                        top_p=settings["top_p"], seed=seed, min_new_tokens=settings["min_new_tokens"])[0]

    report = {"run_dir": str(rd.root), "settings": settings, "n": args.n, "temperatures": {}}
    print(f"best-of-n from {sft} on {len(prompts)} prompts of {settings['prompts']}, judge {settings['judge']}; "
          f"win = the judge prefers the pick to SFT's evaluation sample (seed {settings['seed']}); ties are not wins")
    for temperature in settings["temperatures"]:
        baseline = [float(x) for x in judge(prompts, sample(temperature, settings["seed"]))]
        rm_scores, judge_scores, other_scores = [], [], {name: [] for name in others}
        for k in range(1, args.n + 1):
            texts = sample(temperature, settings["seed"] + k)
            rm_scores.append(reward(prompts, texts))
            judge_scores.append([float(x) for x in judge(prompts, texts)])
            for name, score in others.items():
                other_scores[name].append(score(prompts, texts))
        if len(models) > 1:
            other_scores["mean of " + "+".join(models)] = [
                [sum(other_scores[m][k][i] for m in models) / len(models) for i in range(len(prompts))]
                for k in range(args.n)]
        rows = frontier(rm_scores, judge_scores, baseline)
        key = temperature_key(temperature)
        ppo = _ppo_point(rd, settings, key)
        pickers = {"run's reward model": rm_scores, **other_scores}
        report["temperatures"][key] = {"rows": rows, "ppo": ppo, "pickers": {
            name: {"judge_agreement": judge_agreement(scores, judge_scores),
                   "win_by_n": {row["n"]: best_of_n_win(scores, judge_scores, baseline, row["n"]) for row in rows}}
            for name, scores in pickers.items()}}
        print(f"T={key}   n   KL <=   win (reward model picks)   win (judge picks)")
        for row in rows:
            print(f"      {row['n']:3d}  {row['kl_bound']:5.2f}   {row['rm_pick']['win_rate']:.3f} "
                  f"(ties {row['rm_pick']['ties']:.3f})         {row['judge_pick']['win_rate']:.3f}")
        if ppo:
            print(f"      ppo   {ppo['kl']:5.2f}   {ppo['win_rate']:.3f}   (the run's PPO policy, its eval/results.json)")
        if others:
            print(f"T={key}   picker: agreement with the judge on candidate pairs; win of its best-of-n")
            for name, block in report["temperatures"][key]["pickers"].items():
                wins = "  ".join(f"n={n} {w['win_rate']:.3f}" for n, w in block["win_by_n"].items())
                print(f"      {name}: agreement {block['judge_agreement']:.3f}; {wins}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
