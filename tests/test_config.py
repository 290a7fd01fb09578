"""Config loading, overrides, per-stage DeepSpeed sections and the resolved DeepSpeed config (no training).
Fingerprints and stage inputs are in tests/test_fingerprints.py, the demo data splits in
tests/test_movie_reviews.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import ds_config
from pipeline.config import MovieReviewsSection, PipelineConfig, build_config, config_to_yaml, load_config, read_yaml
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def config_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# loading the shipped configs


def test_demo_config_loads_with_its_values():
    cfg = load_config(DEMO)
    assert cfg.run.name == "demo"
    assert cfg.deepspeed.config == "zero0"
    assert cfg.tracking.backend == "wandb"
    raw = yaml.safe_load(DEMO.read_text())
    assert cfg.pretrain.max_steps == raw["pretrain"]["max_steps"]
    assert cfg.pretrain.lr == pytest.approx(2e-3)
    assert cfg.movie_reviews.reward_words == raw["movie_reviews"]["reward_words"]
    assert cfg.ppo.min_new_tokens == raw["ppo"]["min_new_tokens"] > 0
    assert cfg.pretrain.model.hidden_size == 128
    assert cfg.pretrain.data.train == "movie-reviews:pretrain_train"
    assert cfg.enabled_stages() == ["pretrain", "sft", "reward", "ppo"]


def test_tiny_config_loads_with_tracking_off():
    cfg = load_config(TINY)
    raw = yaml.safe_load(TINY.read_text())
    assert cfg.run.name == "tiny"
    assert cfg.tracking.backend == "none"
    assert cfg.pretrain.max_steps == raw["pretrain"]["max_steps"]
    assert cfg.pretrain.lr == pytest.approx(raw["pretrain"]["lr"])
    assert cfg.pretrain.model.num_layers == raw["pretrain"]["model"]["num_layers"]
    assert cfg.pretrain.data.max_samples == raw["pretrain"]["data"]["max_samples"]
    assert cfg.pretrain.data.eval == "movie-reviews:pretrain_eval"
    assert cfg.movie_reviews.sft_examples == raw["movie_reviews"]["sft_examples"]
    assert cfg.movie_reviews.min_words == MovieReviewsSection().min_words  # unset keys keep defaults


def test_empty_config_gives_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path, ""))
    assert cfg == PipelineConfig()


# rejected configs


def test_unknown_key_names_dotted_key_and_nearest_key(tmp_path):
    message = config_error(write_config(tmp_path, "sft:\n  lrr: 0.1\n"))
    assert "sft.lrr" in message
    assert "did you mean 'lr'" in message
    assert str(tmp_path / "config.yaml") in message


def test_unknown_section_suggests_the_section(tmp_path):
    message = config_error(write_config(tmp_path, "pretrian:\n  lr: 0.1\n"))
    assert "pretrian" in message and "did you mean 'pretrain'" in message


def test_unknown_nested_key_is_named_in_full(tmp_path):
    message = config_error(write_config(tmp_path, "pretrain:\n  model: {hiden_size: 64}\n"))
    assert "pretrain.model.hiden_size" in message and "did you mean 'hidden_size'" in message


def test_wrong_type_names_key_and_value(tmp_path):
    message = config_error(write_config(tmp_path, "run:\n  seed: x\n"))
    assert "run.seed" in message and "integer" in message and "'x'" in message


@pytest.mark.parametrize("value", ["2.5", "true"])
def test_non_integer_step_count_is_rejected(tmp_path, value):
    message = config_error(write_config(tmp_path, f"pretrain:\n  max_steps: {value}\n"))
    assert "pretrain.max_steps" in message and "integer" in message


def test_int_is_accepted_for_float():
    cfg = load_config(TINY, ["sft.lr=1"])
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ("sft.lr=0", "sft.lr"),
        ("pretrain.lr=-0.001", "pretrain.lr"),
        ("ppo.gamma=1.5", "ppo.gamma"),
        ("ppo.gamma=-0.1", "ppo.gamma"),
        ("ppo.lam=2", "ppo.lam"),
        ("ppo.clip_range=0", "ppo.clip_range"),
        ("ppo.clip_range=-0.2", "ppo.clip_range"),
        ("ppo.top_p=0", "ppo.top_p"),
        ("pretrain.max_steps=0", "pretrain.max_steps"),
        ("reward.batch_size=0", "reward.batch_size"),
        ("sft.lora.r=0", "sft.lora.r"),
        ("deepspeed.num_gpus=0", "deepspeed.num_gpus"),
        ("deepspeed.num_nodes=2", "deepspeed.hostfile"),
        ("pretrain.seq_len=512", "pretrain.seq_len"),
        ("movie_reviews.min_words=8", "movie_reviews.min_words"),
        ("movie_reviews.reward_windows=0", "movie_reviews.reward_windows"),
        ("eval.kl_budget=0", "eval.kl_budget"),
        ("eval.top_p=1.5", "eval.top_p"),
        ("run.seed=-1", "run.seed"),
        ("run.seed=4294967296", "run.seed"),
        ("eval.seed=-3", "eval.seed"),
        ("movie_reviews.seed=-1", "movie_reviews.seed"),
        ("ppo.sampling_seed=-1", "ppo.sampling_seed"),
        ("ppo.kl_horizon=0", "ppo.kl_horizon"),
        ("eval.max_new_tokens=-5", "eval.max_new_tokens"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens"),
        ("sft.lora.alpha=0", "sft.lora.alpha"),
    ],
)
def test_impossible_value_is_rejected_naming_the_key(override, key):
    message = config_error(TINY, [override])
    assert f"{key}:" in message


def test_minibatch_larger_than_rollout_batch_is_rejected():
    message = config_error(TINY, ["ppo.rollout_batch_size=8", "ppo.minibatch_size=16"])
    assert "ppo.minibatch_size" in message and "rollout_batch_size" in message


def test_whitening_a_single_response_is_rejected_before_it_can_divide_by_zero():
    one = ["ppo.rollout_batch_size=1", "ppo.minibatch_size=1"]
    message = config_error(TINY, one)
    assert "tiny.yaml: ppo.rollout_batch_size: whitening" in message and "at least 2 responses" in message, message
    assert "ppo.whiten_advantages=false" in message
    message = config_error(TINY, [*one, "ppo.advantage_estimator=reinforce_pp"])  # whitens whatever the flag
    assert "at least 2 responses" in message and "whiten_advantages" not in message, message
    load_config(TINY, [*one, "ppo.whiten_advantages=false"])
    load_config(TINY, ["ppo.rollout_batch_size=2", "ppo.minibatch_size=1"])


def test_rollout_batch_must_divide_across_ranks():
    message = config_error(TINY, ["ppo.enabled=true", "deepspeed.num_gpus=3"])  # default rollout batch 16
    assert "ppo.rollout_batch_size" in message and "3 ranks" in message
    cfg = load_config(TINY, ["deepspeed.num_gpus=3", "ppo.rollout_batch_size=24", "ppo.minibatch_size=12"])
    assert cfg.deepspeed.num_gpus == 3


def test_rollout_batch_checked_against_ppo_stage_ranks():
    message = config_error(TINY, ["ppo.enabled=true", "ppo.deepspeed.num_gpus=3"])
    assert "ppo.rollout_batch_size" in message and "3 ranks" in message
    load_config(TINY, ["ppo.enabled=false", "ppo.deepspeed.num_gpus=3"])  # a disabled stage is not checked


def test_bad_literal_names_allowed_choices():
    message = config_error(TINY, ["ppo.kl_estimator=k4"])
    assert "ppo.kl_estimator" in message and "'k4'" in message
    for choice in ("'k1'", "'k2'", "'k3'"):
        assert choice in message


def test_unknown_deepspeed_preset_names_choices():
    with pytest.raises(ConfigError) as info:
        ds_config.resolve("zer0", micro_batch=1, grad_accum=1, world_size=1, max_grad_norm=1.0,
                          key="sft.deepspeed.config")
    message = str(info.value)
    assert "sft.deepspeed.config" in message and "'zer0'" in message
    for name in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        assert name in message


def test_yaml_syntax_error_reports_file_line_column(tmp_path):
    path = write_config(tmp_path, "run:\n  name: x\npretrain:\n  lr: [1, 2\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    message = str(info.value)
    assert "YAML syntax error" in message
    location = message.split(": YAML", 1)[0]
    file, line, col = location.rsplit(":", 2)
    assert file == str(path)
    assert int(line) in (4, 5) and int(col) >= 1


def test_yaml_syntax_error_through_load_config(tmp_path):
    path = write_config(tmp_path, "run: {name: x\n")
    message = config_error(path)
    assert f"{path}:" in message and "YAML syntax error" in message


def test_missing_config_file_is_a_user_error(tmp_path):
    message = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "not found" in message


def test_top_level_must_be_mapping(tmp_path):
    message = config_error(write_config(tmp_path, "- a\n- b\n"))
    assert "mapping" in message


# overrides


def test_dotted_overrides_are_typed():
    cfg = load_config(TINY, ["pretrain.max_steps=50", "run.seed=3"])
    assert cfg.pretrain.max_steps == 50 and isinstance(cfg.pretrain.max_steps, int)
    assert cfg.run.seed == 3 and isinstance(cfg.run.seed, int)


def test_overrides_parse_bools_null_and_strings():
    cfg = load_config(TINY, ["sft.enabled=false", "pretrain.data.max_samples=null", "run.name=other",
                             "deepspeed.config=zero3"])
    assert cfg.sft.enabled is False
    assert cfg.pretrain.data.max_samples is None
    assert cfg.run.name == "other"
    assert cfg.deepspeed.config == "zero3"
    assert cfg.enabled_stages() == [s for s in load_config(TINY).enabled_stages() if s != "sft"]


@pytest.mark.parametrize("text, expected", [("5e-4", 5e-4), ("1.0e-3", 1e-3), ("3E-5", 3e-5), ("0.01", 0.01)])
def test_float_override_in_exponent_form(text, expected):
    cfg = load_config(TINY, [f"sft.lr={text}"])
    assert cfg.sft.lr == pytest.approx(expected)


def test_exponent_float_in_yaml_file(tmp_path):
    cfg = load_config(write_config(tmp_path, "pretrain:\n  lr: 3e-4\n"))
    assert cfg.pretrain.lr == pytest.approx(3e-4)


def test_nested_override_creates_missing_section():
    cfg = load_config(TINY, ["sft.lora.r=4"])
    assert cfg.sft.lora is not None and cfg.sft.lora.r == 4 and cfg.sft.lora.alpha == 16


def test_tracking_none_override_turns_tracking_off():
    assert load_config(DEMO).tracking.backend == "wandb"
    assert load_config(DEMO, ["tracking=none"]).tracking.backend == "none"
    assert load_config(DEMO, ["tracking.backend=none"]).tracking.backend == "none"


def test_tracking_sub_key_override_keeps_tracking_none():
    cfg = load_config(TINY, ["tracking.project=other"])  # tiny.yaml says `tracking: none`
    assert cfg.tracking.backend == "none"
    assert cfg.tracking.project == "other"


def test_tracking_can_be_turned_back_on():
    cfg = load_config(TINY, ["tracking.backend=wandb"])
    assert cfg.tracking.backend == "wandb"


def test_override_of_unknown_key_is_rejected():
    message = config_error(TINY, ["pretrain.max_step=5"])
    assert "pretrain.max_step" in message and "did you mean 'max_steps'" in message


def test_override_without_value_is_rejected():
    message = config_error(TINY, ["pretrain.max_steps"])
    assert "pretrain.max_steps" in message and "key.sub=value" in message


def test_override_below_scalar_is_rejected():
    message = config_error(TINY, ["run.seed.x=1"])
    assert "run.seed" in message


def test_overrides_do_not_touch_the_file():
    before = TINY.read_text()
    load_config(TINY, ["pretrain.max_steps=50"])
    assert TINY.read_text() == before


# per-stage deepspeed


def test_stage_deepspeed_override_merges_onto_top_level():
    cfg = load_config(TINY, ["sft.deepspeed.num_gpus=2", "deepspeed.config=zero2"])
    sft = cfg.stage_deepspeed("sft")
    assert sft.num_gpus == 2 and sft.config == "zero2"
    pretrain = cfg.stage_deepspeed("pretrain")
    assert pretrain.num_gpus == 1 and pretrain.config == "zero2"
    assert cfg.deepspeed.num_gpus == 1


def test_stage_deepspeed_override_of_unknown_key_is_rejected():
    message = config_error(TINY, ["sft.deepspeed.num_gpu=2"])
    assert "sft.deepspeed.num_gpu" in message and "did you mean 'num_gpus'" in message


def test_stage_deepspeed_override_is_validated():
    message = config_error(TINY, ["reward.deepspeed.num_gpus=0"])
    assert "reward.deepspeed.num_gpus" in message


# round trip


@pytest.mark.parametrize("path, overrides", [
    (DEMO, []),
    (TINY, []),
    (TINY, ["sft.lora.r=4", "sft.deepspeed.num_gpus=2", "ppo.reward_clip=5", "deepspeed.config={stage: 1}",
            "pretrain.lr=3e-5", "ppo.kl_estimator=k3"]),
])
def test_resolved_config_round_trips(path, overrides, tmp_path):
    cfg = load_config(path, overrides)
    text = config_to_yaml(cfg)
    assert build_config(yaml.safe_load(text)) == cfg
    saved = tmp_path / "resolved.yaml"
    saved.write_text(text)
    assert load_config(saved) == cfg


# DeepSpeed config resolution


@pytest.fixture
def cpu_only(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_fills_batch_sizes_and_fp32_on_cpu(cpu_only):
    ds = ds_config.resolve("zero0", micro_batch=4, grad_accum=2, world_size=3, max_grad_norm=0.5)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("preset", ds_config.preset_names())
def test_every_preset_resolves_without_auto(preset, cpu_only):
    # machine_checks off: zero3_nvme's path and async_io op are checked where it runs (test_capabilities_offload.py)
    ds = ds_config.resolve(preset, micro_batch=2, grad_accum=3, world_size=2, max_grad_norm=1.0, machine_checks=False)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 12


def test_resolve_inline_dict_and_json_path(tmp_path, cpu_only):
    inline = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}
    ds = ds_config.resolve(inline, micro_batch=1, grad_accum=4, world_size=2, max_grad_norm=None)
    assert ds["train_batch_size"] == 8 and "gradient_clipping" not in ds
    assert inline == {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}  # not mutated
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    ds = ds_config.resolve(str(path), micro_batch=2, grad_accum=1, world_size=1, max_grad_norm=1.0)
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 2


def test_resolve_rejects_bad_json_and_zero_stage(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"zero_optimization": {"stage": 1},\n  oops}')
    with pytest.raises(ConfigError) as info:
        ds_config.resolve(str(path), micro_batch=1, grad_accum=1, world_size=1, max_grad_norm=1.0)
    assert f"{path}:2:" in str(info.value)
    with pytest.raises(ConfigError) as info:
        ds_config.resolve({"zero_optimization": {"stage": 4}}, micro_batch=1, grad_accum=1, world_size=1,
                          max_grad_norm=1.0)
    assert "stage" in str(info.value)


def test_center_reward_and_normalize_reward_are_one_or_the_other():
    message = config_error(DEMO, ["ppo.center_reward=true", "ppo.normalize_reward=true"])
    assert "ppo.center_reward" in message and "normalize_reward" in message
    assert load_config(DEMO, ["ppo.center_reward=true"]).ppo.center_reward
