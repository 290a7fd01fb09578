"""Stage fingerprints (which keys make a stage rerun) and stage inputs handed off by the upstream manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.checkpoint import make_manifest, write_json
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir, stage_fingerprint, stage_inputs

TINY = Path(__file__).resolve().parents[1] / "tests" / "configs" / "tiny.yaml"


def fingerprint(overrides: list[str], stage: str = "pretrain", run_dir: RunDir | None = None) -> str:
    cfg = load_config(TINY, overrides)
    rd = run_dir or RunDir(Path("/nonexistent-run-dir"))
    return stage_fingerprint(cfg, stage, stage_inputs(cfg, stage, rd))


def test_fingerprint_is_stable():
    assert fingerprint([]) == fingerprint([])


@pytest.mark.parametrize("override", [
    "pretrain.lr=0.002", "pretrain.max_steps=7", "pretrain.model.hidden_size=64", "pretrain.data.max_samples=100",
    "run.seed=1", "deepspeed.config=zero2", "pretrain.deepspeed.num_gpus=2", "movie_reviews.seed=7",
])
def test_fingerprint_changes_with_semantic_key(override):
    assert fingerprint([override]) != fingerprint([])


@pytest.mark.parametrize("override", [
    "pretrain.logging_steps=1", "pretrain.save_steps=2", "pretrain.keep_checkpoints=5", "pretrain.eval_steps=3",
    "tracking.backend=wandb", "run.output_dir=elsewhere", "sft.lr=0.5", "eval.num_prompts=3",
])
def test_fingerprint_ignores_non_semantic_and_unrelated_keys(override):
    assert fingerprint([override]) == fingerprint([])


@pytest.mark.parametrize("override", [
    "deepspeed.master_addr=10.0.0.7", "deepspeed.master_port=29655", "deepspeed.hostfile=/jobs/42/hostfile",
    "deepspeed.launcher_args=[--bind_cores_to_rank]", "pretrain.deepspeed.master_port=29700",
])
def test_fingerprint_ignores_where_the_ranks_meet(override):
    """A resubmitted Slurm job has another first host and hostfile (configs/slurm/rlhf.sbatch): its finished
    stages must stay done and its checkpoints resumable."""
    assert fingerprint([override]) == fingerprint([])


def test_editing_a_data_file_in_place_changes_the_fingerprint(tmp_path):
    """The path stays the same, what it holds does not: the stage must run again, not be 'up to date'.
    Rewriting the same bytes (a copy, a checkout) keeps it; so does a data folder left as it was."""
    import os

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "first version"}\n')
    before = fingerprint([f"pretrain.data.train={data}"])
    data.write_text('{"text": "first version"}\n')
    os.utime(data, ns=(1, 1))
    assert fingerprint([f"pretrain.data.train={data}"]) == before
    data.write_text('{"text": "second version"}\n')
    assert fingerprint([f"pretrain.data.train={data}"]) != before

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text('{"text": "a"}\n')
    before = fingerprint([f"pretrain.data.train={folder}"])
    assert fingerprint([f"pretrain.data.train={folder}"]) == before
    (folder / "part-1.jsonl").write_text('{"text": "b"}\n')
    assert fingerprint([f"pretrain.data.train={folder}"]) != before


def write_pretrain_manifest(rd: RunDir, config_hash: str) -> None:
    manifest = make_manifest(stage="pretrain", config_hash=config_hash, stage_config={}, inputs={},
                             metrics={}, started_at="t0", world_size=1)
    write_json(rd.final_dir("pretrain") / "manifest.json", manifest)


def test_upstream_manifest_hash_changes_downstream_fingerprint(tmp_path):
    rd = RunDir(tmp_path)
    write_pretrain_manifest(rd, "aaaa")
    first = fingerprint([], "sft", rd)
    assert fingerprint([], "sft", rd) == first
    write_pretrain_manifest(rd, "bbbb")
    assert fingerprint([], "sft", rd) != first


def test_sft_input_comes_from_pretrain_manifest(tmp_path):
    rd = RunDir(tmp_path)
    write_pretrain_manifest(rd, "aaaa")
    inputs = stage_inputs(load_config(TINY), "sft", rd)
    assert inputs == {"model": {"path": str(rd.final_dir("pretrain")), "from_stage": "pretrain",
                                "config_hash": "aaaa"}}


def test_explicit_input_wins_over_manifest(tmp_path):
    rd = RunDir(tmp_path)
    write_pretrain_manifest(rd, "aaaa")
    inputs = stage_inputs(load_config(TINY, ["sft.input=/models/base"]), "sft", rd)
    assert inputs["model"]["path"] == "/models/base" and inputs["model"]["from_stage"] is None


def test_missing_upstream_names_the_stage(tmp_path):
    with pytest.raises(UserError) as info:
        stage_inputs(load_config(TINY), "sft", RunDir(tmp_path))
    assert "'pretrain'" in str(info.value) and "sft.input" in str(info.value)


def test_incomplete_upstream_manifest_is_not_an_input(tmp_path):
    rd = RunDir(tmp_path)
    manifest = make_manifest(stage="pretrain", config_hash="aaaa", stage_config={}, inputs={},
                             metrics={}, started_at="t0", world_size=1)
    write_json(rd.final_dir("pretrain") / "manifest.json", {**manifest, "status": "running"})
    with pytest.raises(UserError):
        stage_inputs(load_config(TINY), "sft", rd)
