"""`rlhf eval RUN_DIR` and the end of `rlhf run`: evaluate a run dir's policies and publish the results.

The policies are the final checkpoints the run dir holds: sft (reference and baseline), ppo when it
finished, and the pretrained model with --include-base. Results go to RUN_DIR/eval/results.json, the
terminal, and the tracker as a W&B run with job_type "eval".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import movie_reviews
from pipeline.checkpoint import read_json, write_json
from pipeline.config import PipelineConfig
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import (BASELINE, eval_settings, evaluate_policies, format_table,
                                          load_fluency_model, load_prompts)
from pipeline.evaluation.judges import check_judge
from pipeline.preflight import missing_local_data
from pipeline.rundir import RunDir, RunLock, completed_final, load_run_config, require_run_dir
from pipeline.typed import to_dict


class HackingSuspected(UserError):
    """`rlhf eval --strict`: a guard fired."""


def optimised_reward_model(cfg: PipelineConfig, rd: RunDir) -> str:
    """The reward model the run's PPO optimised: ppo.reward_model, else the reward stage's final."""
    return cfg.ppo.reward_model or str(rd.final_dir("reward"))


def results_path(rd: RunDir) -> Path:
    return rd.root / "eval" / "results.json"


def find_policies(rd: RunDir, include_base: bool) -> dict[str, str]:
    """Policy name -> final checkpoint dir: sft is required (it is the reference), ppo when complete and
    trained from that sft."""
    if not rd.root.is_dir():
        raise UserError(f"{rd.root}: run dir not found")
    if completed_final(rd, "sft") is None:
        raise UserError(f"{rd.final_dir('sft')}: no complete sft checkpoint; eval needs it as the reference policy")
    policies = {}
    if include_base:
        if completed_final(rd, "pretrain") is None:
            raise UserError(f"--include-base: {rd.final_dir('pretrain')}: no complete pretrain checkpoint")
        policies["pretrain"] = str(rd.final_dir("pretrain"))
    policies["sft"] = str(rd.final_dir("sft"))
    ppo = completed_final(rd, "ppo")
    stale = ppo and stale_ppo(rd, ppo)
    if ppo is None:
        print(f"[eval] note: no complete ppo checkpoint in {rd.final_dir('ppo')}; evaluating without it", flush=True)
    elif stale:
        print(f"[eval] note: ppo skipped: {stale}", flush=True)
    else:
        policies["ppo"] = str(rd.final_dir("ppo"))
    return policies


def stale_ppo(rd: RunDir, ppo: dict[str, Any]) -> str | None:
    """Why the run's ppo policy cannot be judged against its sft policy (None: it can): it was trained from
    an earlier sft result than the one sft/final holds now (sft re-ran under another config since)."""
    actor = (ppo.get("inputs") or {}).get("actor") or {}
    sft_hash = (completed_final(rd, "sft") or {}).get("config_hash")
    if actor.get("from_stage") != "sft" or actor.get("config_hash") == sft_hash:
        return None
    return (f"{rd.final_dir('ppo')} was trained from a different sft (config hash {actor.get('config_hash')}; "
            f"{rd.final_dir('sft')} is now {sft_hash}); run the ppo stage again to evaluate it")


def held_out_prompts(cfg: PipelineConfig, rd: RunDir, num_prompts: int | None,
                     prompts_source: str | None = None) -> list[str] | None:
    """`prompts_source` (else eval.prompts, else ppo.data.eval), the first `num_prompts` (default
    eval.num_prompts); None if no source is set. Both arguments are written into `cfg.eval`."""
    if num_prompts is not None:
        if num_prompts < 1:
            raise UserError(f"--num-prompts: must be >= 1 (got {num_prompts})")
        cfg.eval.num_prompts = num_prompts
    if prompts_source is not None:
        name = prompts_source[len(movie_reviews.PREFIX):]
        if prompts_source.startswith(movie_reviews.PREFIX) and name not in movie_reviews.SPLITS:
            raise UserError(f"--prompts: unknown split '{prompts_source}'; choices: "
                            + ", ".join(movie_reviews.PREFIX + s for s in movie_reviews.SPLITS))
        if missing_local_data(prompts_source):
            raise UserError(f"--prompts: data file not found: {prompts_source}")
        cfg.eval.prompts = prompts_source
    return load_prompts(cfg, rd.data_dir)


def evaluate_run(rd: RunDir, cfg: PipelineConfig, prompts: list[str], policies: dict[str, str]) -> dict[str, Any]:
    """Generate from each policy, judge, compare with sft; write results.json, print and log them."""
    import torch

    reward = completed_final(rd, "reward")
    print(f"[eval] {', '.join(policies)} on {len(prompts)} held-out prompts; judge: {cfg.eval.judge}", flush=True)
    results = evaluate_policies(
        policies, reference=policies[BASELINE], prompts=prompts, settings=eval_settings(cfg, len(prompts)),
        fluency_lm=load_fluency_model(cfg, rd.data_dir), reward_model=str(rd.final_dir("reward")) if reward else None,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    results["paths"] = dict(policies)
    return publish(rd, cfg, results)


def with_reward_model(rd: RunDir, results: dict[str, Any]) -> dict[str, Any]:
    """Add the reward model's held-out accuracy (in place; returns `results`)."""
    reward = completed_final(rd, "reward")
    results["reward_model"] = reward and {
        "path": str(rd.final_dir("reward")),
        "eval_accuracy": reward.get("metrics", {}).get("eval_accuracy"),  # held-out preference pairs
    }
    return results


def print_results(results: dict[str, Any]) -> None:
    print(format_table(results))
    if results["reward_model"] and results["reward_model"]["eval_accuracy"] is not None:
        print(f"reward model held-out pair accuracy: {results['reward_model']['eval_accuracy']:.4f}")


def publish(rd: RunDir, cfg: PipelineConfig, results: dict[str, Any]) -> dict[str, Any]:
    """Add the reward model's held-out accuracy; write results.json, print the table, log to the tracker."""
    with_reward_model(rd, results)
    write_json(results_path(rd), results)
    print_results(results)
    log_results(cfg, rd, results)
    print(f"[eval] results: {results_path(rd)}", flush=True)
    return results


def already_published(rd: RunDir, results: dict[str, Any]) -> bool:
    """Whether results.json holds exactly `results` (as written: JSON, reward model included)."""
    return read_json(results_path(rd)) == json.loads(json.dumps(results, default=str))


def ppo_stage_evaluation(rd: RunDir, cfg: PipelineConfig, n_prompts: int) -> dict[str, Any] | None:
    """The evaluation the ppo stage ran on its own final checkpoint, if it is exactly the one the end of
    `rlhf run` would run now: the same sft and ppo checkpoints, reward model, prompts and settings."""
    ppo = completed_final(rd, "ppo")
    sft = completed_final(rd, "sft")
    results = (ppo or {}).get("evaluation")
    if not results or sft is None:
        return None
    inputs = ppo.get("inputs", {})
    paths = {name: Path(path).resolve() for name, path in results.get("paths", {}).items()}
    same_policies = paths == {"sft": rd.final_dir("sft").resolve(), "ppo": rd.final_dir("ppo").resolve()}
    same_inputs = (inputs.get("actor", {}).get("config_hash") == sft.get("config_hash")
                   and Path(inputs.get("reward_model", {}).get("path", "")).resolve() == rd.final_dir("reward").resolve())
    if same_policies and same_inputs and results.get("settings") == eval_settings(cfg, n_prompts):
        return results
    return None


def flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """`eval/T<t>/<policy>/<metric>` for every number, win rates included; each policy's verdict;
    the reward model's accuracy."""
    out: dict[str, Any] = {}
    for t, block in results["temperatures"].items():
        for name, summary in block["policies"].items():
            numbers = {**summary, **block["win_rates"].get(name, {})}
            out.update({f"eval/T{t}/{name}/{k}": v for k, v in numbers.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name, v in results.get("verdicts", {}).items():
        out[f"eval/{name}/win"] = int(v["win"])
        out[f"eval/{name}/reward_hacking_suspected"] = ", ".join(v["hacking_suspected"]) or "none"
        out[f"eval/{name}/verdict"] = v["line"]
    accuracy = (results.get("reward_model") or {}).get("eval_accuracy")
    if accuracy is not None:
        out["eval/reward_model/eval_accuracy"] = accuracy
    return out


def log_results(cfg: PipelineConfig, rd: RunDir, results: dict[str, Any]) -> None:
    """One tracker run per evaluation (job_type "eval"); with `tracking: none` only eval/metrics.jsonl."""
    from pipeline.tracking import make_tracker

    stage_dir = rd.root / "eval"
    # Each evaluation is its own W&B run: do not resume the previous evaluation's run id.
    (stage_dir / "wandb_run_id").unlink(missing_ok=True)
    tracker = make_tracker(cfg.tracking, rank=0, run_name=cfg.run.name, stage="eval", stage_dir=stage_dir,
                           config={"eval": to_dict(cfg.eval), "settings": results["settings"],
                                   "policies": results.get("paths", {})})
    try:
        metrics = flat_metrics(results)
        tracker.log(metrics)
        tracker.summary(metrics)
        rows = [[t, name, s["prompt"], s["response"], s["judge"]]
                for t, block in results["temperatures"].items()
                for name, samples in block["samples"].items() for s in samples]
        tracker.log_table("eval/samples", ["temperature", "policy", "prompt", "response", "judge"], rows)
    finally:
        tracker.finish()


def run_eval_command(run_dir: str, include_base: bool, num_prompts: int | None, prompts_source: str | None = None,
                     seed: int | None = None, strict: bool = False) -> dict[str, Any]:
    """`rlhf eval`: the run's own config, under the run lock so no stage rewrites a checkpoint meanwhile.
    `prompts_source` and `seed` replace eval.prompts and eval.seed for this evaluation only. With
    `strict`, a fired guard raises `HackingSuspected` (exit 2) after the results are written."""
    rd = require_run_dir(Path(run_dir))
    cfg = load_run_config(rd)
    with RunLock(rd):
        policies = find_policies(rd, include_base)
        check_judge(cfg.eval.judge, optimised_reward_model(cfg, rd))
        if seed is not None:
            cfg.eval.seed = seed
        prompts = held_out_prompts(cfg, rd, num_prompts, prompts_source)
        if not prompts:
            raise UserError(f"{rd.config_path}: no held-out prompts; set eval.prompts or ppo.data.eval")
        results = evaluate_run(rd, cfg, prompts, policies)
    hacked = {name: v["hacking_suspected"] for name, v in results["verdicts"].items() if v["hacking_suspected"]}
    if strict and hacked:
        raise HackingSuspected("--strict: reward hacking suspected: " + "; ".join(
            f"{name}: {', '.join(gs)}" for name, gs in hacked.items()) + f" (see {results_path(rd)})")
    return results


def evaluate_after_pipeline(rd: RunDir, cfg: PipelineConfig) -> None:
    """The end of `rlhf run` (run lock held, complete sft final present): evaluate, or say why not."""
    prompts = held_out_prompts(cfg, rd, None)
    if not prompts:
        print("[eval] skipped: no held-out prompts (set eval.prompts or ppo.data.eval)", flush=True)
        return
    check_judge(cfg.eval.judge, optimised_reward_model(cfg, rd))
    reused = ppo_stage_evaluation(rd, cfg, len(prompts))
    if reused is not None:
        # The same policies, prompts, seeds and settings give the same numbers: do not generate twice.
        print(f"[eval] the ppo stage already evaluated sft and ppo on these {len(prompts)} prompts with these "
              "settings; reusing its results (`rlhf eval` regenerates)", flush=True)
        results = with_reward_model(rd, dict(reused))
        if already_published(rd, results):  # an earlier `rlhf run` published them: log no second eval run
            print_results(results)
            print(f"[eval] results (unchanged): {results_path(rd)}", flush=True)
            return
        publish(rd, cfg, results)
        return
    evaluate_run(rd, cfg, prompts, find_policies(rd, include_base=False))
