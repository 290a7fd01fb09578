"""Win rate against KL and fluency for every PPO setting tried, judged together on one prompt set.

Each policy is a PPO final checkpoint trained from the same SFT and reward model; all of them and the
SFT baseline sample on the same prompts with the same seed at every eval temperature (one evaluation,
`pipeline.evaluation.evaluate_policies`), so the rows compare directly. Prints the table and each
policy's verdict, and writes JSON and a plot of win rate against KL and against fluency:

    python bench/tradeoff.py configs/demo.yaml --sft RUN/sft/final --reward RUN/reward/final \\
        --policy old=runs/p0/ppo/final --policy clip1=runs/p4/ppo/final ... \\
        [--prompts movie-reviews:heldout_prompts] [--out bench/results/tradeoff]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation.evaluate import (eval_settings, evaluate_policies, format_table,  # noqa: E402
                                          load_fluency_model, load_prompts)
from pipeline.evaluation.guards import suspected  # noqa: E402


def plot(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    blocks = results["temperatures"]
    fig = Figure(figsize=(10, 3.6 * len(blocks)))
    axes = fig.subplots(len(blocks), 2, squeeze=False)
    for row, (t, block) in enumerate(blocks.items()):
        base = block["policies"]["sft"]
        for col, (key, label) in enumerate((("kl_to_reference", "KL to SFT (nats/response)"),
                                            ("fluency_nll", "fluency NLL / SFT's"))):
            ax = axes[row][col]
            for name, wr in block["win_rates"].items():
                p = block["policies"][name]
                x = p[key] / base[key] if key == "fluency_nll" else p[key]
                hacked = bool(suspected(block["guards"][name]))
                ax.scatter([x], [wr["win_rate"]], color="tab:red" if hacked else "tab:green")
                ax.annotate(name, (x, wr["win_rate"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
            ax.axhline(0.75, color="gray", linestyle="--", linewidth=0.8)
            if key == "fluency_nll":
                ax.axvline(1.10, color="gray", linestyle=":", linewidth=0.8)
            elif results["settings"]["kl_budget"]:
                ax.axvline(results["settings"]["kl_budget"], color="gray", linestyle=":", linewidth=0.8)
            ax.set(xlabel=label, ylabel="win rate vs SFT", title=f"T={t} (red: a guard fired)")
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--sft", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--policy", action="append", required=True, help="NAME=PPO_FINAL_DIR")
    parser.add_argument("--prompts", help="prompt source (default: the config's eval prompts)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tradeoff"))
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.prompts:
        cfg.eval.prompts = args.prompts
    policies = {"sft": args.sft, **dict(p.split("=", 1) for p in args.policy)}
    with tempfile.TemporaryDirectory() as data_dir:
        prompts = load_prompts(cfg, Path(data_dir))
        fluency = load_fluency_model(cfg, Path(data_dir))
    results = evaluate_policies(policies, reference=args.sft, prompts=prompts,
                                settings=eval_settings(cfg, len(prompts)), fluency_lm=fluency,
                                reward_model=args.reward)
    results["paths"] = policies
    print(format_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
