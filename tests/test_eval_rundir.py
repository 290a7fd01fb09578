"""Which policies `rlhf eval` and the end of `rlhf run` judge, and what they publish, from a run dir's
manifests alone (stand-in checkpoints: no model is loaded here)."""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import write_json
from pipeline.evaluation.rundir import find_policies
from pipeline.rundir import RunDir


def publish(rd: RunDir, stage: str, config_hash: str, inputs: dict | None = None) -> None:
    write_json(rd.final_dir(stage) / "manifest.json",
               {"stage": stage, "status": "complete", "config_hash": config_hash, "inputs": inputs or {}})


def ppo_from(rd: RunDir, sft_hash: str) -> None:
    actor = {"path": str(rd.final_dir("sft")), "from_stage": "sft", "config_hash": sft_hash}
    publish(rd, "ppo", "p1", {"actor": actor})


def test_ppo_is_judged_against_the_sft_it_was_trained_from(tmp_path, capsys):
    rd = RunDir(tmp_path)
    publish(rd, "sft", "s1")
    ppo_from(rd, "s1")
    assert find_policies(rd, include_base=False) == {"sft": str(rd.final_dir("sft")), "ppo": str(rd.final_dir("ppo"))}


def test_ppo_trained_from_an_earlier_sft_is_skipped_saying_why(tmp_path, capsys):
    rd = RunDir(tmp_path)
    publish(rd, "sft", "s2")  # sft re-ran under a new config after ppo finished
    ppo_from(rd, "s1")
    assert find_policies(rd, include_base=False) == {"sft": str(rd.final_dir("sft"))}
    out = capsys.readouterr().out
    assert f"ppo skipped: {rd.final_dir('ppo')} was trained from a different sft (config hash s1;" in out, out


def test_reused_ppo_evaluation_is_logged_once_however_often_run_ends(tmp_path, monkeypatch):
    """A no-op `rlhf run` reuses the ppo stage's evaluation: results.json is already it, so no new W&B
    eval run and no second eval/metrics.jsonl row."""
    from pipeline.config import load_config
    from pipeline.evaluation import rundir as evaluation
    from tests.conftest import TINY

    rd, cfg = RunDir(tmp_path), load_config(TINY)
    publish(rd, "sft", "s1")
    ppo_from(rd, "s1")
    results = {"settings": {"baseline": "sft"}, "temperatures": {}, "verdicts": {},
               "paths": {"sft": str(rd.final_dir("sft")), "ppo": str(rd.final_dir("ppo"))}}
    logged = []
    monkeypatch.setattr(evaluation, "held_out_prompts", lambda *a: ["a prompt"])
    monkeypatch.setattr(evaluation, "check_judge", lambda *a: None)
    monkeypatch.setattr(evaluation, "ppo_stage_evaluation", lambda *a: dict(results))
    monkeypatch.setattr(evaluation, "log_results", lambda cfg, rd, results: logged.append(results))
    for _ in range(3):
        evaluation.evaluate_after_pipeline(rd, cfg)
    assert len(logged) == 1
    assert (rd.root / "eval" / "results.json").exists()
