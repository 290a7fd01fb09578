"""The real `rlhf` CLI end to end on the tiny config: pretraining, skips, re-runs and status. Its refusals of
bad input are in the catalogue, tests/test_catalogue.py.

One pretraining run is shared by the module (fixture `run`); tests that change a run dir work on
a copy of it, so the tests do not depend on their order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.checkpoint import CHECKPOINT_MARKERS, complete_checkpoints, read_json
from pipeline.config import config_to_yaml, load_config
from pipeline.rundir import RunDir, stage_fingerprint, stage_inputs
from tests.conftest import RLHF, ROOT, TINY

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


MORE_STEPS = load_config(TINY).pretrain.max_steps + 1  # a semantic change for re-run tests


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false"}


def start(*args: str | Path) -> subprocess.Popen:
    # Output goes to files, not pipes, so a process running beside another never blocks on a full pipe.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([*RLHF, *map(str, args)], cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True,
                            start_new_session=True)  # its own process group, so a timeout ends the ranks too
    proc.outputs = (out, err)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: int = 900) -> Result:
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out, err = proc.outputs  # type: ignore[attr-defined]
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read())
        f.close()
    assert not timed_out, f"rlhf timed out after {timeout}s:\n{texts[0][-4000:]}\n{texts[1][-4000:]}"
    return Result(proc.returncode, *texts)


def rlhf(*args: str | Path) -> Result:
    return finish(start(*args))


def checked(result: Result) -> Result:
    assert result.returncode == 0, f"rlhf run failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def start_pretrain(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return start("run", TINY, "--run-dir", run_dir, "--stages", "pretrain", *overrides)


def run_pretrain(run_dir: Path, *overrides: str) -> Result:
    return checked(finish(start_pretrain(run_dir, *overrides)))


@dataclass
class PretrainRun:
    dir: Path
    result: Result
    manifest_bytes: bytes
    manifest_mtime_ns: int

    @property
    def final(self) -> Path:
        return self.dir / "pretrain" / "final"

    @property
    def manifest(self) -> dict:
        return json.loads(self.manifest_bytes)


@dataclass
class Runs:
    base: PretrainRun
    more_steps_final: Path  # a fresh run made with MORE_STEPS from the start


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """The shared tiny pretraining run, and a fresh MORE_STEPS run started beside it to save time."""
    base_dir = tmp_path_factory.mktemp("cli") / "run"
    more_dir = tmp_path_factory.mktemp("cli-more-steps") / "run"
    base = start_pretrain(base_dir)
    more = start_pretrain(more_dir, f"pretrain.max_steps={MORE_STEPS}")
    result = checked(finish(base))
    checked(finish(more))
    manifest = base_dir / "pretrain" / "final" / "manifest.json"
    return Runs(PretrainRun(base_dir, result, manifest.read_bytes(), manifest.stat().st_mtime_ns),
                more_dir / "pretrain" / "final")


@pytest.fixture(scope="module")
def run(runs) -> PretrainRun:
    return runs.base


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy, symlinks=True)
    return copy


# a pretraining run


def test_pretrain_writes_the_resolved_config(run):
    assert "[pretrain] starting" in run.result.stdout
    assert "pipeline finished" in run.result.stdout
    resolved = run.dir / "config.yaml"
    assert resolved.read_text() == config_to_yaml(load_config(TINY))
    assert load_config(resolved) == load_config(TINY)


def test_final_checkpoint_holds_weights_tokenizer_and_manifest(run):
    names = {p.name for p in run.final.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    assert not any(p.name.startswith(".tmp") for p in (run.dir / "pretrain").iterdir())


def test_manifest_describes_the_run(run):
    m = run.manifest
    assert m["stage"] == "pretrain"
    assert m["status"] == "complete"
    cfg = load_config(TINY)
    assert m["config_hash"] == stage_fingerprint(cfg, "pretrain", stage_inputs(cfg, "pretrain", RunDir(run.dir)))
    assert m["inputs"] == {"model": None, "tokenizer": None}
    metrics = m["metrics"]
    assert metrics["steps"] == cfg.pretrain.max_steps
    for key in ("initial_perplexity", "perplexity"):
        assert math.isfinite(metrics[key]) and metrics[key] > 1
    assert metrics["perplexity"] < metrics["initial_perplexity"]  # a few steps already help
    # A fresh model is close to uniform over the trained tokenizer's vocabulary.
    assert metrics["initial_perplexity"] < 2 * cfg.pretrain.tokenizer_vocab_size
    for lib in ("torch", "transformers", "deepspeed"):
        assert m["libraries"][lib] not in ("", "not installed")
    started, finished = (datetime.fromisoformat(m[k]) for k in ("started_at", "finished_at"))
    assert started <= finished
    assert m["stage_config"]["max_steps"] == cfg.pretrain.max_steps and "logging_steps" not in m["stage_config"]


def test_final_checkpoint_loads_with_transformers(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.final)
    model = AutoModelForCausalLM.from_pretrained(run.final)
    for token in ("pad", "bos", "eos"):
        assert getattr(tokenizer, f"{token}_token") is not None
        assert getattr(tokenizer, f"{token}_token_id") is not None
    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Continue the review: A fine film"}],
                                         tokenize=False, add_generation_prompt=True)
    assert "A fine film" in chat
    arch = load_config(TINY).pretrain.model
    assert model.config.hidden_size == arch.hidden_size and model.config.num_hidden_layers == arch.num_layers
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    ids = tokenizer("This movie was", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_sft_input_is_handed_off_through_the_manifest(run):
    cfg = load_config(run.dir / "config.yaml")
    inputs = stage_inputs(cfg, "sft", RunDir(run.dir))
    assert inputs == {"model": {"path": str(run.final), "from_stage": "pretrain",
                                "config_hash": run.manifest["config_hash"]}}


# skips and re-runs


def test_same_command_skips_and_leaves_the_checkpoint_alone(run):
    weights = run.final / "model.safetensors"
    weights_mtime = weights.stat().st_mtime_ns
    result = run_pretrain(run.dir)
    assert "[pretrain] skipped" in result.stdout
    assert "[pretrain] starting" not in result.stdout
    manifest = run.final / "manifest.json"
    assert manifest.read_bytes() == run.manifest_bytes
    assert manifest.stat().st_mtime_ns == run.manifest_mtime_ns
    assert weights.stat().st_mtime_ns == weights_mtime


def test_non_semantic_change_still_skips(run):
    result = run_pretrain(run.dir, "pretrain.logging_steps=1", "pretrain.save_steps=2")
    assert "[pretrain] skipped" in result.stdout
    assert (run.final / "manifest.json").read_bytes() == run.manifest_bytes


def test_semantic_change_reruns_from_scratch(runs, run_copy):
    from safetensors.torch import load_file

    run = runs.base
    result = run_pretrain(run_copy, f"pretrain.max_steps={MORE_STEPS}")
    assert "[pretrain] starting" in result.stdout and "skipped" not in result.stdout
    final = run_copy / "pretrain" / "final"
    manifest = read_json(final / "manifest.json")
    assert manifest["config_hash"] != run.manifest["config_hash"]
    assert manifest["metrics"]["steps"] == MORE_STEPS
    assert manifest["stage_config"]["max_steps"] == MORE_STEPS
    # The old config's checkpoints must not be resumed: the result equals a fresh run with the new config.
    rerun = load_file(final / "model.safetensors")
    fresh = load_file(runs.more_steps_final / "model.safetensors")
    assert rerun.keys() == fresh.keys()
    for name in fresh:
        assert (rerun[name] - fresh[name]).abs().max().item() < 1e-5, name
    # Whatever periodic checkpoints remain resumable belong to the new config.
    for ckpt in complete_checkpoints(run_copy / "pretrain"):
        marker = read_json(ckpt / CHECKPOINT_MARKERS[0])
        assert marker["config_hash"] == manifest["config_hash"], ckpt
    # ... and the new final is now the up-to-date one.
    again = run_pretrain(run_copy, f"pretrain.max_steps={MORE_STEPS}")
    assert "[pretrain] skipped" in again.stdout


# status


def test_status_lists_stages_checkpoint_and_metrics(run):
    result = rlhf("status", run.dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    states = {line.split()[0]: " ".join(line.split()[1:]) for line in lines if line and not line.startswith(" ")}
    assert states["pretrain"] == "complete"
    for stage in ("sft", "reward", "ppo"):
        assert states[stage] == "not started"
    assert f"checkpoint: {run.final}" in result.stdout
    assert f"perplexity={run.manifest['metrics']['perplexity']:.4g}" in result.stdout
    assert f"initial_perplexity={run.manifest['metrics']['initial_perplexity']:.4g}" in result.stdout
    assert run.manifest["config_hash"] in result.stdout
