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
    publish(rd, "ppo", "p1", {"actor": {"path": str(rd.final_dir("sft")), "from_stage": "sft", "config_hash": sft_hash}})


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
