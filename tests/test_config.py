"""Config loading, overrides, fingerprints, DeepSpeed resolution and the demo data splits (no training)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline import ds_config, movie_reviews
from pipeline.checkpoint import make_manifest, write_json
from pipeline.config import (MovieReviewsSection, PipelineConfig, build_config, config_to_yaml, load_config,
                             read_yaml)
from pipeline.errors import ConfigError, UserError
from pipeline.rundir import RunDir, stage_fingerprint, stage_inputs

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
    ],
)
def test_impossible_value_is_rejected_naming_the_key(override, key):
    message = config_error(TINY, [override])
    assert f"{key}:" in message


def test_minibatch_larger_than_rollout_batch_is_rejected():
    message = config_error(TINY, ["ppo.rollout_batch_size=8", "ppo.minibatch_size=16"])
    assert "ppo.minibatch_size" in message and "rollout_batch_size" in message


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


# fingerprints


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


# movie-reviews splits

SMALL = MovieReviewsSection(eval_text_docs=20, sft_examples=40, sft_eval_examples=10, reward_pairs=40,
                            reward_eval_pairs=10, ppo_prompts=40, eval_prompts=10)


@pytest.fixture(scope="module")
def reviews():
    return movie_reviews.load_reviews()


@pytest.fixture(scope="module")
def splits():
    return movie_reviews.build_splits(SMALL)


def opening(text: str, cfg: MovieReviewsSection = SMALL) -> tuple[str, str]:
    """(prompt, continuation) of a review, worked out here independently of the module."""
    words = text.split()
    prompt = f"{cfg.instruction} {' '.join(words[:cfg.prompt_words])}"
    return prompt, " ".join(words[cfg.prompt_words:cfg.prompt_words + cfg.continuation_words])


def test_splits_have_the_configured_sizes(splits):
    assert set(splits) == set(movie_reviews.SPLITS)
    sizes = {name: len(rows) for name, rows in splits.items()}
    assert sizes["sft_train"] == 40 and sizes["sft_eval"] == 10
    assert sizes["reward_train"] == 40 and sizes["reward_eval"] == 10
    assert sizes["ppo_train"] == 40 and sizes["ppo_eval"] == 10
    assert sizes["pretrain_eval"] == 20 and sizes["pretrain_train"] > 1000


def test_splits_are_deterministic(splits):
    assert movie_reviews.build_splits(SMALL) == splits


def test_different_seed_gives_different_splits(splits, reviews, monkeypatch):
    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))  # skip re-reading the CSV
    other = movie_reviews.build_splits(MovieReviewsSection(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert other["sft_train"] != splits["sft_train"]


def test_rows_have_their_fields(splits):
    for name in ("pretrain_train", "pretrain_eval"):
        assert all(set(r) == {"text"} and r["text"] for r in splits[name])
    for name in ("sft_train", "sft_eval"):
        assert all(set(r) == {"prompt", "completion"} for r in splits[name])
    for name in ("reward_train", "reward_eval"):
        assert all(set(r) == {"prompt", "chosen", "rejected"} for r in splits[name])
    for name in ("ppo_train", "ppo_eval", "heldout_prompts"):
        assert all(set(r) == {"prompt", "label"} and r["label"] in (0, 1) for r in splits[name])
    prompts = [r["prompt"] for n in ("sft_train", "reward_train", "ppo_train") for r in splits[n]]
    assert all(p.startswith(SMALL.instruction + " ") and len(p.split()) == 3 + SMALL.prompt_words for p in prompts)


def test_html_line_breaks_are_stripped(splits):
    assert movie_reviews.clean("Great.<br /><br />Really   great.<br/>Yes<br>") == "Great. Really great. Yes"
    for rows in splits.values():
        for row in rows:
            for value in row.values():
                assert "<br" not in str(value)


def source_keys(splits) -> dict[str, set[tuple[str, str]]]:
    """Each split's rows as the (prompt, continuation) of the reviews they were cut from."""
    keys = {
        name: {opening(r["text"]) for r in splits[name]} for name in ("pretrain_train", "pretrain_eval")
    }
    for name in ("sft_train", "sft_eval"):
        keys[name] = {(r["prompt"], r["completion"]) for r in splits[name]}
    return keys


def test_splits_are_disjoint(splits, reviews):
    texts = {name: {r["text"] for r in splits[name]} for name in ("pretrain_train", "pretrain_eval")}
    assert not texts["pretrain_train"] & texts["pretrain_eval"]
    pretrain_keys = {opening(t) for name in texts for t in texts[name]}

    # A review opening may be used as often as the data holds reviews that start with it: two
    # reviews can share their first words, one review must never feed two splits.
    prompt_splits = ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval")
    available = Counter(opening(r.text)[0] for r in reviews)
    used = Counter(key[0] for key in pretrain_keys)
    for name in prompt_splits:
        used.update(r["prompt"] for r in splits[name])
    assert {p: (n, available[p]) for p, n in used.items() if n > available[p]} == {}

    sft = {(r["prompt"], r["completion"]) for n in ("sft_train", "sft_eval") for r in splits[n]}
    assert not sft & pretrain_keys
    train_prompts = {r["prompt"] for r in splits["sft_train"]}
    assert not train_prompts & {r["prompt"] for r in splits["sft_eval"]}
    continuations = {c for _, c in sft}
    responses = {r[k] for n in ("reward_train", "reward_eval") for r in splits[n] for k in ("chosen", "rejected")}
    assert not continuations & responses
    assert not (continuations | responses) & {c for _, c in pretrain_keys}


def test_heldout_prompts_open_the_pretrain_eval_reviews(splits, reviews):
    """A second evaluation set: the openings of the reviews held out from pretraining, which no stage
    trains on, in their order, long enough to be prompts."""
    held_out = [r["text"] for r in splits["pretrain_eval"] if len(r["text"].split()) >= SMALL.min_words]
    assert held_out and [r["prompt"] for r in splits["heldout_prompts"]] == [opening(t)[0] for t in held_out]
    label_of = {r.text: r.label for r in reviews}
    assert [r["label"] for r in splits["heldout_prompts"]] == [label_of[t] for t in held_out]


def test_reward_pairs_follow_human_labels_and_are_balanced(splits, reviews):
    label_of = {opening(r.text): r.label for r in reviews}
    labels_by_continuation: dict[str, set[int]] = {}
    for r in reviews:
        labels_by_continuation.setdefault(opening(r.text)[1], set()).add(r.label)

    for name in ("reward_train", "reward_eval"):
        from_chosen = from_rejected = 0
        for row in splits[name]:
            assert labels_by_continuation[row["chosen"]] == {1}, row
            assert labels_by_continuation[row["rejected"]] == {0}, row
            chosen_key, rejected_key = (row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])
            assert (chosen_key in label_of) != (rejected_key in label_of), "prompt must open exactly one of the pair"
            if chosen_key in label_of:
                assert label_of[chosen_key] == 1
                from_chosen += 1
            else:
                assert label_of[rejected_key] == 0
                from_rejected += 1
        assert from_chosen == from_rejected == len(splits[name]) // 2, name


def test_sft_and_ppo_rows_come_from_their_own_reviews(splits, reviews):
    label_of = {opening(r.text): r.label for r in reviews}
    prompt_labels: dict[str, set[int]] = {}
    for key, label in label_of.items():
        prompt_labels.setdefault(key[0], set()).add(label)
    for name in ("sft_train", "sft_eval"):
        assert all((r["prompt"], r["completion"]) in label_of for r in splits[name])
    for name in ("ppo_train", "ppo_eval"):
        rows = splits[name]
        assert all(r["label"] in prompt_labels[r["prompt"]] for r in rows)
        assert sum(r["label"] for r in rows) == len(rows) // 2  # balanced positive/negative


def test_pretrain_holds_all_unused_reviews(splits, reviews):
    used = sum(len(splits[n]) for n in ("sft_train", "sft_eval", "ppo_train", "ppo_eval"))
    used += 2 * sum(len(splits[n]) for n in ("reward_train", "reward_eval"))
    pretrain = len(splits["pretrain_train"]) + len(splits["pretrain_eval"])
    assert pretrain + used == len(reviews)


def test_prepare_writes_jsonl_once_per_recipe(tmp_path, monkeypatch, splits):
    splits = {name: rows[:50] for name, rows in splits.items()}
    calls = []
    monkeypatch.setattr(movie_reviews, "build_splits", lambda cfg: calls.append(cfg) or splits)
    out = tmp_path / "movie-reviews"
    movie_reviews.prepare(SMALL, out)
    for name in movie_reviews.SPLITS:
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert rows == splits[name]
    movie_reviews.prepare(SMALL, out)
    assert calls == [SMALL]  # same recipe: nothing rebuilt
    (out / "ppo_eval.jsonl").unlink()
    movie_reviews.prepare(SMALL, out)
    assert len(calls) == 2 and (out / "ppo_eval.jsonl").exists()  # a missing split is rebuilt
    other = MovieReviewsSection(**{**SMALL.__dict__, "seed": 5})
    movie_reviews.prepare(other, out)
    assert calls[-1] == other  # a new recipe rebuilds


def test_reward_words_lengthen_the_pair_responses_only(reviews, monkeypatch):
    """Preference responses may run longer than the SFT completions: the same continuation, further on."""
    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))
    longer = MovieReviewsSection(**{**SMALL.__dict__, "reward_words": 40, "min_words": 50})
    splits = movie_reviews.build_splits(longer)
    label_of = {opening(r.text, longer): r.label for r in reviews}
    long_label_of = {}
    for r in reviews:
        words = r.text.split()
        long_label_of[" ".join(words[longer.prompt_words:longer.prompt_words + 40])] = r.label
    for name in ("reward_train", "reward_eval"):
        for row in splits[name]:
            assert len(row["chosen"].split()) == len(row["rejected"].split()) == 40  # min_words keeps them whole
            assert long_label_of[row["chosen"]] == 1 and long_label_of[row["rejected"]] == 0
    for name in ("sft_train", "sft_eval"):
        assert all((r["prompt"], r["completion"]) in label_of and len(r["completion"].split()) == 20
                   for r in splits[name])


def test_splits_larger_than_the_data_name_the_key(reviews, monkeypatch):
    from pipeline.errors import ConfigError

    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))
    with pytest.raises(ConfigError, match=r"^movie_reviews\.reward_pairs: asks for 50000 reviews .* only \d+ are left"):
        movie_reviews.build_splits(MovieReviewsSection(**{**SMALL.__dict__, "reward_pairs": 50000}))


def test_reward_windows_add_later_stretches_of_the_same_training_reviews(splits, reviews, monkeypatch):
    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))  # skip re-reading the CSV
    two = movie_reviews.build_splits(MovieReviewsSection(**{**SMALL.__dict__, "reward_windows": 2}))
    first, later = two["reward_train"][:40], two["reward_train"][40:]
    assert first == splits["reward_train"]  # the first stretch of each pair is unchanged
    assert two["reward_eval"] == splits["reward_eval"]  # held-out pairs: first stretches only
    assert 0 < len(later) <= 40
    texts = {r.text for r in reviews}
    first_by_prompt = {r["prompt"]: r for r in first}
    for row in later:
        # the words right after the first stretch, in the same positive (chosen) and negative (rejected) reviews
        base = first_by_prompt[row["prompt"]]
        for key in ("chosen", "rejected"):
            assert len(row[key].split()) >= SMALL.continuation_words // 2
            assert any(f"{base[key]} {row[key]}" in t for t in texts), (key, row)
    assert not {r["chosen"] for r in later} & {r["chosen"] for r in first}
