"""W&B tracking through the real CLI in offline mode, read back from the run files W&B writes.

Each stage's run lives in `RUN_DIR/<stage>/wandb/offline-run-*/run-<id>.wandb`: a LevelDB-style log of
`wandb_internal_pb2.Record` protobufs (wandb 0.31 reads it in its Go core only, so `records` below reads
the blocks itself). Checked: one run per stage and per rank count, grouped by run name, typed by stage;
the Trainer's and the PPO loop's metrics with rising steps; the samples table; the stage config without
secrets; the final manifest metrics in the summary; a SIGKILLed PPO stage resuming the same run id; and
`tracking: none` writing nothing of W&B's.
"""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from pipeline.tracking import scrub
from tests.conftest import kill_at_checkpoint
from tests.test_ppo_stage import RUN_TIMEOUT_S, cli_env, rlhf_command, tiny, write_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


TINY = Path(__file__).parent / "configs" / "tiny.yaml"
SECRET = "secret-should-not-leak-123"
WANDB = ("tracking.backend=wandb", "tracking.mode=offline")
TRAINER_STAGES = ("pretrain", "sft", "reward")
PPO_KEYS = ("ppo/reward_mean", "ppo/kl_to_ref", "ppo/policy_loss", "ppo/value_loss", "time/rollout_s",
            "time/update_s", "time/step_s")


# ---------------------------------------------------------------------------------------------------------------
# reading a .wandb file

BLOCK, HEADER = 32768, 7  # LevelDB log: 32 KiB blocks of records, each `crc32 u32 | length u16 | type u8 | data`
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every complete Record in the file, in order; a tail cut off by a kill is ignored."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B", f"{path}: not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # too little room for a record: the block ends in padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length:
            return
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        parts.append(chunk)
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _key(item) -> str:
    """`key`, or a nested key joined by dots: a logged table's fields arrive as `ppo/samples` . `path` etc."""
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    dir: Path  # .../wandb/offline-run-<time>-<id>
    run: Any  # the RunRecord: run_id, run_group, job_type, display_name
    config: dict[str, Any]  # every config update, merged
    history: list[dict[str, Any]]  # one dict per logged step
    summary: dict[str, Any]  # as it stands at the end


def read_run(run_dir: Path) -> WandbRun:
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    run, config, history, summary = None, {}, [], {}
    for record in records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({_key(u): json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
            for removed in record.summary.remove:
                summary.pop(_key(removed), None)
    assert run is not None, f"{files[0]}: no run record"
    return WandbRun(run_dir, run, config, history, summary)


def offline_runs(stage_dir: Path) -> list[WandbRun]:
    """The stage's W&B runs, oldest first (the directory name starts with the start time)."""
    return [read_run(d) for d in sorted((stage_dir / "wandb").glob("offline-run-*"))]


# ---------------------------------------------------------------------------------------------------------------
# running the CLI


def wandb_env(root: Path) -> dict[str, str]:
    """Offline W&B with an API key in the environment (it must never reach a file); W&B's own config and
    cache dirs under `root`, so the test leaves the home directory alone; no WANDB_* from the caller."""
    env = {k: v for k, v in cli_env().items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_MODE": "offline", "WANDB_API_KEY": SECRET,
            **{f"WANDB_{d}_DIR": str(root / "wandb_home" / d.lower()) for d in ("CONFIG", "CACHE", "DATA")}}


def rlhf(config: Path, run_dir: Path, *overrides: str) -> str:
    """Run the CLI from the run dir's parent (a rank that wrongly starts W&B would leave `./wandb` there)."""
    root = run_dir.parent
    proc = subprocess.run(rlhf_command(config, run_dir, *overrides), env=wandb_env(root), cwd=root,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"rlhf run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def files_holding_the_key(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())


def steps(history: list[dict[str, Any]], key: str, step_key: str = "_step") -> list[int]:
    return [row[step_key] for row in history if key in row]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[Path, str]:
    """tiny.yaml (pretrain, SFT, reward) with W&B offline: (run dir, CLI output)."""
    root = tmp_path_factory.mktemp("pipeline")
    run_dir = root / "run"
    return run_dir, rlhf(TINY, run_dir, *WANDB, "tracking.log_checkpoint_artifact=true")


PPO = dict(eval_enabled=False, max_steps=4)


@pytest.fixture(scope="module")
def ppo_two_ranks(tiny, tmp_path_factory) -> tuple[Path, str]:
    """A fresh PPO stage on two ranks, a samples table every 2 steps: (run dir, CLI output)."""
    root = tmp_path_factory.mktemp("ppo_two_ranks")
    config = write_config(root / "ppo.yaml", tiny, deepspeed={"config": "zero2", "num_gpus": 2}, save_steps=None,
                          **PPO)
    run_dir = root / "run"
    return run_dir, rlhf(config, run_dir, *WANDB, "tracking.sample_every=2")


# ---------------------------------------------------------------------------------------------------------------
# 1. the Trainer stages: pretrain, SFT, reward


def test_one_run_per_stage_grouped_by_run_name(pipeline_run):
    run_dir, _ = pipeline_run
    ids = set()
    for stage in TRAINER_STAGES:
        runs = offline_runs(run_dir / stage)
        assert len(runs) == 1, f"{stage}: {[r.dir.name for r in runs]}"
        (wb,) = runs
        run_id = (run_dir / stage / "wandb_run_id").read_text().strip()
        assert wb.dir.name.endswith(f"-{run_id}") and wb.run.run_id == run_id
        assert manifest(run_dir, stage)["wandb_run_id"] == run_id
        assert (wb.run.run_group, wb.run.job_type, wb.run.display_name) == ("tiny", stage, f"tiny-{stage}")
        assert wb.run.project == "rlhf-pipeline"
        ids.add(run_id)
    assert len(ids) == len(TRAINER_STAGES)
    assert not (run_dir.parent / "wandb").exists()


def test_trainer_stages_log_train_loss_at_rising_steps(pipeline_run):
    run_dir, _ = pipeline_run
    # logging_steps 2, and every save step is a logging step too (pretrain saves at 3 and 6)
    for stage, logged in (("pretrain", [2, 3, 4, 6]), ("sft", [2, 4]), ("reward", [2, 4])):
        history = offline_runs(run_dir / stage)[0].history
        assert steps(history, "train/loss", "train/global_step") == logged, stage
        all_steps = [row["_step"] for row in history]
        assert all_steps == sorted(set(all_steps)), f"{stage}: W&B steps not strictly rising: {all_steps}"
    assert "eval/loss" in offline_runs(run_dir / "sft")[0].summary


def test_config_record_holds_the_stage_config(pipeline_run):
    run_dir, _ = pipeline_run
    for stage in TRAINER_STAGES:
        trainer_and_ours = offline_runs(run_dir / stage)[0].config
        assert trainer_and_ours["max_steps"] == 6 if stage == "pretrain" else 4  # the Trainer's arguments
        config, done = trainer_and_ours["pipeline"], manifest(run_dir, stage)
        assert config["run"]["name"] == "tiny"
        assert config["config_hash"] == done["config_hash"]
        assert config["deepspeed"]["config"] == "zero0"
        assert config[stage]["max_steps"] == done["stage_config"]["max_steps"]
        assert config[stage]["lr"] == pytest.approx(1.0e-3)


def test_summary_holds_the_final_manifest_metrics(pipeline_run):
    run_dir, _ = pipeline_run
    for stage in TRAINER_STAGES:
        summary = offline_runs(run_dir / stage)[0].summary
        metrics = {k: v for k, v in manifest(run_dir, stage)["metrics"].items() if isinstance(v, (int, float))}
        assert metrics, stage
        for key, value in metrics.items():
            assert summary.get(f"final/{key}") == pytest.approx(value), f"{stage}: final/{key}"


def test_each_final_checkpoint_is_a_model_artifact_by_reference(pipeline_run):
    """`tracking.log_checkpoint_artifact`: each stage's run logs its final/ as a model artifact that points at
    the directory (nothing uploaded), with the config hash that produced it."""
    run_dir, _ = pipeline_run
    for stage in TRAINER_STAGES:
        [run] = offline_runs(run_dir / stage)
        [artifact] = [r.artifact for r in records(next(run.dir.glob("run-*.wandb")))
                      if r.WhichOneof("record_type") == "artifact"]
        assert (artifact.name, artifact.type) == (f"tiny-{stage}", "model")  # run.name, stage
        assert json.loads(artifact.metadata)["config_hash"] == manifest(run_dir, stage)["config_hash"]
        final = (run_dir / stage / "final").resolve()
        refs = {entry.ref for entry in artifact.manifest.contents}  # one per file, pointing into final/
        assert refs == {f.as_uri() for f in final.rglob("*") if f.is_file()} and "model.safetensors" in str(refs)


def test_offline_run_prints_how_to_sync(pipeline_run):
    run_dir, out = pipeline_run
    for stage in TRAINER_STAGES:
        (wb,) = offline_runs(run_dir / stage)
        assert f"upload with: wandb sync {wb.dir}" in out, stage


def test_scrub_redacts_credentials_at_any_depth():
    config = {"judge": {"api_key": "k", "HF_TOKEN": "t", "apiKey": "a", "steps": 3,
                        "list": [{"db-password": "p", "n": "x"}]},
              "pretrain": {"tokenizer": "gpt2", "max_new_tokens": 8, "keep_checkpoints": 2}}
    assert scrub(config) == {
        "judge": {"api_key": "<redacted>", "HF_TOKEN": "<redacted>", "apiKey": "<redacted>", "steps": 3,
                  "list": [{"db-password": "<redacted>", "n": "x"}]},
        "pretrain": {"tokenizer": "gpt2", "max_new_tokens": 8, "keep_checkpoints": 2},  # contain a marker, no secret
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. PPO on two ranks: one run, the loop's metrics and the samples table


def test_two_rank_ppo_is_one_run_with_step_metrics_and_samples(ppo_two_ranks):
    run_dir, out = ppo_two_ranks
    stage_dir = run_dir / "ppo"
    assert manifest(run_dir, "ppo")["world_size"] == 2
    (wb,) = offline_runs(stage_dir)
    run_id = (stage_dir / "wandb_run_id").read_text().strip()
    assert wb.run.run_id == run_id and (wb.run.run_group, wb.run.job_type) == ("ppotest", "ppo")
    assert [p for p in run_dir.rglob("wandb") if p != stage_dir / "wandb"] == []  # nothing from rank 1
    assert not (run_dir.parent / "wandb").exists()
    assert out.count("upload with: wandb sync") == 1

    for key in PPO_KEYS:
        assert steps(wb.history, key) == [1, 2, 3, 4], key
    tables = [row for row in wb.history if "ppo/samples._type" in row]
    assert [row["_step"] for row in tables] == [2, 4]  # sample_every=2
    assert {row["ppo/samples._type"] for row in tables} == {"table-file"}
    table = json.loads((wb.dir / "files" / tables[-1]["ppo/samples.path"]).read_text())
    assert table["columns"] == ["prompt", "response", "reward"]
    assert len(table["data"]) == 4  # rank 0's share of the rollout batch of 8

    summary, metrics = wb.summary, manifest(run_dir, "ppo")["metrics"]
    assert summary["final/reward_mean"] == pytest.approx(metrics["reward_mean"])
    assert summary["final/steps"] == 4
    config = wb.config["pipeline"]
    assert config["ppo"]["rollout_batch_size"] == 8 and config["deepspeed"]["num_gpus"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 3. a PPO stage killed after its step-2 checkpoint continues the same W&B run


def test_killed_ppo_stage_resumes_the_same_run(tiny, tmp_path):
    config = write_config(tmp_path / "ppo.yaml", tiny, save_steps=2, **PPO)
    run_dir = tmp_path / "run"
    marker = run_dir / "ppo" / "checkpoint-2" / "rlhf_complete.json"  # written last: the checkpoint is complete
    kill_at_checkpoint(rlhf_command(config, run_dir, *WANDB), marker.parent, tmp_path / "killed_run.log",
                       wandb_env(tmp_path), RUN_TIMEOUT_S, cwd=tmp_path)
    run_id = (run_dir / "ppo" / "wandb_run_id").read_text().strip()
    assert json.loads(marker.read_text())["wandb_run_id"] == run_id

    out = rlhf(config, run_dir, *WANDB)
    assert f"resumed from {run_dir / 'ppo' / 'checkpoint-2'} at step 2" in out, out[-4000:]
    assert (run_dir / "ppo" / "wandb_run_id").read_text().strip() == run_id
    assert manifest(run_dir, "ppo")["wandb_run_id"] == run_id
    # W&B flushes its file every 15 s, so the killed run may have left only the header: read the new one
    killed, resumed = sorted((run_dir / "ppo" / "wandb").glob("offline-run-*"))
    assert killed.name.endswith(f"-{run_id}") and resumed.name.endswith(f"-{run_id}")
    resumed = read_run(resumed)
    assert resumed.run.run_id == run_id
    assert steps(resumed.history, "ppo/reward_mean") == [3, 4]  # continues after the checkpoint
    assert resumed.summary["final/steps"] == 4
    assert files_holding_the_key(tmp_path) == [] and SECRET not in out


# ---------------------------------------------------------------------------------------------------------------
# 4. secrets and `tracking: none`


def test_api_key_reaches_no_file(pipeline_run, ppo_two_ranks):
    """The key is in every process's environment; no config, manifest, log or W&B file may hold it."""
    for run_dir, out in (pipeline_run, ppo_two_ranks):
        assert files_holding_the_key(run_dir.parent) == []
        assert SECRET not in out


def test_tracking_none_writes_nothing_of_wandb(tiny, tmp_path):
    """SFT alone (a Trainer stage: its W&B callback must stay off too) with tiny.yaml's `tracking: none`."""
    run_dir = tmp_path / "run"
    out = rlhf(TINY, run_dir, "pretrain.enabled=false", "reward.enabled=false", f"sft.input={tiny.policy_dir}",
               "sft.max_steps=2", "sft.logging_steps=1")  # WANDB_MODE=offline is still in the environment
    assert list(tmp_path.rglob("*wandb*")) == []
    assert "wandb sync" not in out
    assert manifest(run_dir, "sft")["wandb_run_id"] is None
    logged = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "train/loss" in row] == [1, 2]
