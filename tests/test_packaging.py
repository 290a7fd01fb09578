"""Shipped configs resolve fully, and the Docker image installs what constraints.txt pins."""

import re
from pathlib import Path

import pytest

from pipeline import ds_config
from pipeline.config import STAGE_ORDER, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "examples").glob("*.yaml"))


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[name.lower()] = version
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_resolves_with_existing_presets(path):
    cfg = load_config(path)
    for stage in STAGE_ORDER:
        section = cfg.stage(stage)
        ds = cfg.stage_deepspeed(stage)
        # PPO steps once per minibatch (split over the ranks); the Trainer stages by micro-batch x accumulation
        micro, accum = ((section.minibatch_size // ds.world_size, 1) if stage == "ppo"
                        else (section.batch_size, section.grad_accum))
        resolved = ds_config.resolve(ds.config, micro_batch=micro, grad_accum=accum,
                                     world_size=ds.world_size, max_grad_norm=section.max_grad_norm)
        assert resolved["train_batch_size"] == micro * accum * ds.world_size
        assert "auto" not in str(resolved["train_micro_batch_size_per_gpu"])


def test_example_configs_cover_zero3_and_lora():
    examples = [load_config(p) for p in (ROOT / "configs" / "examples").glob("*.yaml")]
    assert any(c.deepspeed.config == "zero3" for c in examples)
    assert any(c.sft.lora is not None and c.ppo.lora is not None for c in examples)


def test_every_preset_is_valid_json_with_a_zero_stage():
    names = ds_config.preset_names()
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero3_nvme"} <= set(names)
    for name in names:
        assert ds_config.zero_stage(ds_config.load_preset(name)) in (0, 1, 2, 3)


def test_dockerfile_copies_existing_files_and_uses_the_pins():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    base = re.search(r"ARG BASE=\S+:(\d+\.\d+\.\d+)-", text).group(1)
    assert base == pins()["torch"], "base image torch must match the constraints pin"
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert '"rlhf"' in text


def test_pyproject_dependencies_are_all_pinned():
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    deps = [re.split(r"[<>=\[]", d.strip().strip('",'))[0].lower() for d in block.splitlines() if d.strip()]
    missing = [d for d in deps if d not in pins()]
    assert not missing, f"not pinned in constraints.txt: {missing}"


def test_long_ppo_demo_is_the_demo_up_to_ppo():
    """configs/demo_long_ppo.yaml differs from the demo only in PPO: its first three stages hash the same, so
    on a copy of a demo run dir (run.name=demo) it reuses them, and what README reports for it is the longer PPO
    alone."""
    from pipeline.rundir import stage_fingerprint

    demo, long_ppo = load_config(ROOT / "configs" / "demo.yaml"), load_config(ROOT / "configs" / "demo_long_ppo.yaml")
    for stage in ("pretrain", "sft", "reward"):
        assert stage_fingerprint(demo, stage, {}) == stage_fingerprint(long_ppo, stage, {}), stage
    assert stage_fingerprint(demo, "ppo", {}) != stage_fingerprint(long_ppo, "ppo", {})
    # the file is a copy of the demo's (configs have no includes): these are its only differences
    assert long_ppo == load_config(ROOT / "configs" / "demo.yaml", [
        "run.name=demo_long_ppo", "ppo.rollout_batch_size=64", "ppo.minibatch_size=32", "ppo.max_steps=320",
        "ppo.save_steps=80"])
