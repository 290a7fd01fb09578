"""`rlhf report RUN_DIR`: PNG plots and a markdown report from what the run dir holds, no tracker needed.

    RUN_DIR/report/
      <stage>_loss.png      train/loss (and eval_loss) per step, from <stage>/metrics.jsonl
      ppo_training.png      PPO reward mean, KL to the reference and response length per step
      eval_judge.png        judge mean +- stderr per policy, from eval/results.json or the ppo manifest
      report.md             the plots, the eval table and each stage's manifest metrics

Anything the run dir lacks is skipped with a note in the report, never an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.checkpoint import atomic_write_text, read_json
from pipeline.config import STAGE_ORDER
from pipeline.errors import UserError
from pipeline.evaluation.guards import suspected
from pipeline.rundir import RunDir, completed_final, require_run_dir

Series = list[tuple[int, float]]

LOSS_KEYS = {
    "pretrain": ("train/loss", "eval_loss"),
    "sft": ("train/loss", "eval_loss"),
    "reward": ("train/loss", "eval_loss"),
    "ppo": ("ppo/policy_loss", "ppo/value_loss"),
}
PPO_PANELS = (("ppo/reward_mean", "reward mean"), ("ppo/kl_to_ref", "KL to reference"),
              ("ppo/response_length", "response length (tokens)"))
EVAL_COLUMNS = ("judge_mean", "judge_stderr", "reward_model_mean", "win_rate", "kl_to_reference", "mean_length",
                "fluency_nll", "rep_2", "rep_3", "top_bigram_share", "real_word_share", "distinct_2")


def read_metrics(path: Path) -> dict[str, Series]:
    """metric -> [(step, value)] sorted by step; a step logged twice (a resume replays it) keeps the last value.

    Deduplicated per metric: the Trainer logs train and eval rows for the same step separately.
    """
    latest: dict[str, dict[int, float]] = {}
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                latest.setdefault(key, {})[step] = float(value)
    return {key: sorted(by_step.items()) for key, by_step in latest.items()}


def _figure(rows: int = 1, height: float = 3.2, integer_x: bool = True):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, height * rows), dpi=100)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    if integer_x:  # steps
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def plot_losses(metrics: dict[str, Series], keys: tuple[str, ...], title: str, out: Path) -> bool:
    present = [k for k in keys if metrics.get(k)]
    if not present:
        return False
    fig, (ax,) = _figure()
    for key in present:
        steps, values = zip(*metrics[key])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return True


def plot_ppo(metrics: dict[str, Series], out: Path) -> bool:
    panels = [(k, label) for k, label in PPO_PANELS if metrics.get(k)]
    if not panels:
        return False
    fig, axes = _figure(len(panels), height=2.4)
    for ax, (key, label) in zip(axes, panels):
        steps, values = zip(*metrics[key])
        ax.plot(steps, values)
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_title("PPO")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out)
    return True


def plot_eval(results: dict[str, Any], out: Path) -> bool:
    """Judge mean +- stderr per policy, one group of bars per sampling temperature."""
    blocks = results.get("temperatures") or {}
    names = list(next(iter(blocks.values()), {}).get("policies", {}))
    if not names:
        return False
    fig, (ax,) = _figure(integer_x=False)
    width = 0.8 / len(blocks)
    for i, (t, block) in enumerate(blocks.items()):
        xs = [j + i * width for j in range(len(names))]
        means = [block["policies"][n]["judge_mean"] for n in names]
        errors = [block["policies"][n].get("judge_stderr", 0.0) for n in names]
        bars = ax.bar(xs, means, width, yerr=errors, capsize=4, label=f"T={t}")
        ax.bar_label(bars, fmt="%.3f")
    ax.set_xticks([j + width * (len(blocks) - 1) / 2 for j in range(len(names))], names)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend()
    ax.set(title=f"judge: {results.get('settings', {}).get('judge', '?')} (mean +- stderr)", ylabel="judge mean")
    fig.tight_layout()
    fig.savefig(out)
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def eval_markdown(results: dict[str, Any]) -> str:
    """The eval results as markdown: per temperature one row per policy, win rates and failed guards against
    the baseline; then the verdicts and a few responses of each policy side by side."""
    settings = results.get("settings", {})
    parts = []
    for t, block in results["temperatures"].items():
        rows = []
        for name, s in block["policies"].items():
            row = dict(s, win_rate=block["win_rates"].get(name, {}).get("win_rate", "-"))
            rows.append([name] + [row.get(c, "-") for c in EVAL_COLUMNS])
        parts += [f"### T={t}", markdown_table(["policy", *EVAL_COLUMNS], rows)]
        for name, wr in block["win_rates"].items():
            failed = suspected(block["guards"].get(name, {}))
            parts.append(f"- {name} vs {settings.get('baseline', 'baseline')}: wins {wr['wins']:.3f}, "
                         f"ties {wr['ties']:.3f}, losses {wr['losses']:.3f}; guards failed: {', '.join(failed) or 'none'}")
    parts += [f"**{v['line']}**" for v in results.get("verdicts", {}).values()]
    accuracy = (results.get("reward_model") or {}).get("eval_accuracy")
    if accuracy is not None:
        parts.append(f"- reward model held-out pair accuracy: {accuracy:.4f}")
    if settings:
        parts.append("- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    first = next(iter(results["temperatures"].items()), None)
    if first:
        t, block = first
        names = list(block["samples"])
        rows = [[block["samples"][names[0]][i]["prompt"]] + [block["samples"][n][i]["response"] for n in names]
                for i in range(len(block["samples"][names[0]]))]
        parts += [f"Responses at T={t} (the same prompts, picked by the eval seed):",
                  markdown_table(["prompt", *names], [[str(c).replace("|", "/") for c in r] for r in rows])]
    return "\n\n".join(parts)


def find_eval_results(rd: RunDir) -> tuple[dict[str, Any] | None, str]:
    """(results, where they came from): `rlhf eval`'s results.json, else the PPO stage's own evaluation."""
    path = rd.root / "eval" / "results.json"
    results = read_json(path)
    if isinstance(results, dict) and results.get("temperatures"):
        return results, str(path)
    ppo = completed_final(rd, "ppo") or {}
    if isinstance(ppo.get("evaluation"), dict) and ppo["evaluation"].get("temperatures"):
        return ppo["evaluation"], f"{rd.final_dir('ppo')}/manifest.json"
    return None, ""


def build_report(run_dir: str) -> Path:
    """Write the plots and report.md under RUN_DIR/report; returns the report's path."""
    rd = require_run_dir(Path(run_dir))  # never writes a report into a folder that is not a run
    out = rd.root / "report"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # a plot whose data is gone must not linger beside the new report
        old.unlink()
    md = [f"# Report: {rd.root.name}", "", f"Run dir: `{rd.root}`", ""]
    notes = []

    def skipped(note: str) -> None:
        notes.append(note)
        md.extend([f"_Skipped: {note}._", ""])

    for stage in STAGE_ORDER:
        md.extend([f"## {stage}", ""])
        if not rd.stage_dir(stage).exists():
            skipped(f"{stage}: not run")
            continue
        metrics = read_metrics(rd.stage_dir(stage) / "metrics.jsonl")
        image = out / f"{stage}_loss.png"
        if plot_losses(metrics, LOSS_KEYS[stage], f"{stage} loss", image):
            md.extend([f"![{stage} loss]({image.name})", ""])
        else:
            skipped(f"{stage}: no {' or '.join(LOSS_KEYS[stage])} rows in {stage}/metrics.jsonl")
        if stage == "ppo":
            if plot_ppo(metrics, out / "ppo_training.png"):
                md.extend(["![PPO reward, KL and length](ppo_training.png)", ""])
            else:
                skipped("ppo: no reward/KL/length rows in ppo/metrics.jsonl")
        manifest = completed_final(rd, stage)
        if manifest is None:
            skipped(f"{stage}: no complete final checkpoint, so no manifest metrics")
            continue
        numbers = [[k, v] for k, v in manifest.get("metrics", {}).items() if isinstance(v, (int, float, str))]
        md.extend([f"Manifest metrics (`{stage}/final/manifest.json`, finished {manifest.get('finished_at')}):", "",
                   markdown_table(["metric", "value"], numbers) if numbers else "(none)", ""])

    md.extend(["## Evaluation", ""])
    results, source = find_eval_results(rd)
    if results is None:
        skipped("evaluation: no eval/results.json and no evaluation in the ppo manifest (run `rlhf eval`)")
    else:
        md.extend([f"From `{source}`.", ""])
        if plot_eval(results, out / "eval_judge.png"):
            md.extend(["![judge mean per policy](eval_judge.png)", ""])
        md.extend([eval_markdown(results), ""])

    report = out / "report.md"
    atomic_write_text(report, "\n".join(md))
    for note in notes:
        print(f"[report] skipped: {note}")
    return report
