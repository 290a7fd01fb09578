"""Bad input: every case stops with a one-line error naming the culprit, exit code 2, and leaves the run dir's
checkpoints and manifests byte for byte as they were. A traceback appears only with `--debug`.

The cases run `rlhf` in this process (`pipeline.cli.main`) on a copy of one shared tiny pretraining run
(tests/errors_shared.py), with each stage's worker also run in this process instead of under the DeepSpeed
launcher (fixture `rlhf_here`): config and path errors are refused before any stage starts; errors found
inside a stage (data, model/tokenizer, resume) go through the real stage code, the worker's exit code and the
orchestrator's report of it. Failures during training (NaN, a full disk) and the secrets check are in
tests/test_errors_training.py ("training::"); what needs no launch at all is in
tests/test_errors_units.py ("units::").

Item -> test ("cli.py::" etc.: an existing test in tests/test_cli.py etc.):

Before training
- YAML syntax error (line, column) .... test_yaml_syntax_error_names_file_line_and_column
- unknown key, nearest key suggested .. cli.py::test_unknown_key_exits_2_with_one_line_and_touches_nothing,
                                        cli.py::test_unknown_key_in_config_file_exits_2
- wrong type .......................... test_bad_config_value_is_refused_before_launch[wrong-type]
- learning rate zero or negative ...... test_bad_config_value_is_refused_before_launch[lr-zero, lr-negative]
- batch not dividing across ranks ..... test_bad_config_value_is_refused_before_launch[rollout-ranks, minibatch-ranks]
- PPO minibatch above the rollout ..... test_bad_config_value_is_refused_before_launch[minibatch-above-rollout]
- clip ranges <= 0 .................... test_bad_config_value_is_refused_before_launch[clip-zero, value-clip-neg]
- gamma, lambda outside [0, 1] ........ test_bad_config_value_is_refused_before_launch[gamma-above-1, lam-below-0]
- max length shorter than the prompt .. test_max_length_shorter_than_every_prompt_is_refused
- missing model/tokenizer/data path ... test_bad_path_is_refused_before_launch[missing-data, -model, -tokenizer]
- unreadable model dir / data file .... test_bad_path_is_refused_before_launch[model-without-weights],
                                        test_bad_data_stops_the_stage[broken-json]
- hub id while offline, no hang ....... test_hub_id_while_offline_is_refused_at_once
- empty dataset ....................... test_bad_data_stops_the_stage[blank-file], and [empty-file] of
                                        sft_reward.py::test_bad_data_stops_the_stage_naming_file_row_and_field
- rows missing a field, empty strings . [missing-field] and [empty-string] of the same
- wrong types in rows ................. test_bad_data_stops_the_stage[wrong-type]
- prompts filling the whole context ... test_prompts_filling_the_context_are_refused
- chosen == rejected (warn, count) .... units::test_identical_pairs_are_warned_about_with_a_count
- tokenizer larger than embeddings .... test_model_tokenizer_mismatch_is_refused[vocab-above-embeddings]
- no chat template where needed ....... test_model_tokenizer_mismatch_is_refused[no-chat-template]
- reward model with several outputs ... test_bad_path_is_refused_before_launch[reward-model-3-outputs],
                                        sft_reward.py::test_reward_refuses_a_classifier_with_several_outputs
- run dir of another run: name ........ cli.py::test_run_dir_of_another_run_is_refused
- run dir of another run: config ...... test_interrupted_stage_of_another_config_is_not_resumed
During training ("training::": tests/test_errors_training.py)
- NaN/inf loss (step, last good) ..... training::test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint
- NaN/inf reward ...................... training::test_nan_reward_stops_ppo_naming_the_step_and_last_good_checkpoint
- disk full while saving ....... training::test_disk_full_while_saving_keeps_the_last_checkpoint_and_says_how_much
- tracker unreachable ................. units::test_unreachable_tracker_falls_back_to_offline_with_one_warning
- traceback only with --debug ......... test_traceback_only_with_debug (every refusal above asserts none)
Security
- safetensors only, no pickle ......... test_pickle_weights_are_never_loaded, [pickle-weights-only] above
- trust_remote_code off by default .... units::test_remote_code_is_not_run_unless_configured
- secrets in no file or output ........ training::test_secrets_reach_no_file_or_output,
                                        tracking.py::test_api_key_reaches_no_file (the W&B run config too)
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import complete_checkpoints
from tests.conftest import ROOT, TINY
from tests.errors_shared import (assert_untouched, checkpoint_files, copy_run, final_of, model_variant, refused,
                                 run_args, write_jsonl)

pytest_plugins = ["tests.errors_shared"]  # fixtures pretrained, run_dir, rlhf_here
pytestmark = pytest.mark.slow  # launches the CLI (in process) and stage workers: not in the fast tier


# ---------------------------------------------------------------------------------------------------------------
# 1. config: refused before anything starts


def test_yaml_syntax_error_names_file_line_and_column(run_dir, rlhf_here, tmp_path):
    lines = TINY.read_text().splitlines()
    number = lines.index("  lr: 1.0e-3") + 1
    lines[number - 1] = "  lr: 1.0e-3: 2"  # "mapping values are not allowed here", at the second colon
    bad = tmp_path / "bad.yaml"
    bad.write_text("\n".join(lines) + "\n")
    before = checkpoint_files(run_dir)
    line = refused(rlhf_here("run", bad, "--run-dir", run_dir), f"{bad}:{number}:13:", "YAML syntax error")
    assert "mapping values are not allowed here" in line
    assert_untouched(run_dir, before)


@pytest.mark.parametrize("overrides, culprits", [
    (["pretrain.batch_size=four"], ["pretrain.batch_size", "integer", "'four'"]),
    (["sft.lr=0"], ["sft.lr", "must be > 0", "got 0.0"]),
    (["reward.lr=-1e-4"], ["reward.lr", "must be > 0", "got -0.0001"]),
    (["ppo.enabled=true", "deepspeed.num_gpus=3"], ["ppo.rollout_batch_size", "3 ranks", "got 16"]),
    (["ppo.enabled=true", "deepspeed.num_gpus=3", "ppo.rollout_batch_size=24", "ppo.minibatch_size=8"],
     ["ppo.minibatch_size", "3 ranks", "got 8"]),
    (["ppo.rollout_batch_size=8", "ppo.minibatch_size=16"],
     ["ppo.minibatch_size", "rollout_batch_size x samples_per_prompt (8)"]),
    (["ppo.clip_range=0"], ["ppo.clip_range:", "must be > 0"]),
    (["ppo.clip_range_value=-0.1"], ["ppo.clip_range_value:", "must be > 0"]),
    (["ppo.gamma=1.5"], ["ppo.gamma", "[0, 1]", "1.5"]),
    (["ppo.lam=-0.1"], ["ppo.lam", "[0, 1]", "-0.1"]),
], ids=["wrong-type", "lr-zero", "lr-negative", "rollout-ranks", "minibatch-ranks", "minibatch-above-rollout",
        "clip-zero", "value-clip-neg", "gamma-above-1", "lam-below-0"])
def test_bad_config_value_is_refused_before_launch(run_dir, rlhf_here, overrides, culprits):
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, "pretrain,sft", *overrides))
    refused(result, str(TINY), *culprits)
    assert "starting" not in result.stdout and "skipped" not in result.stdout
    assert_untouched(run_dir, before)


# ---------------------------------------------------------------------------------------------------------------
# 2. paths: refused before the stage launches


@pytest.fixture(scope="module")
def bad_models(pretrained, tmp_path_factory) -> dict[str, Path]:
    """Model dirs that must never be loaded: no weights; pickle weights only; a 3-output reward model."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("bad_models")
    no_weights = model_variant(pretrained, root / "no_weights", drop=("*.safetensors",))
    pickled = model_variant(pretrained, root / "pickled", drop=("*.safetensors",))
    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump(Unpickled(root / "unpickled"), f)  # unpickling it makes that dir: the proof it was loaded
    three = AutoModelForSequenceClassification.from_pretrained(final_of(pretrained), num_labels=3)
    three.save_pretrained(root / "three_outputs")
    return {"no_weights": no_weights, "pickled": pickled, "three_outputs": root / "three_outputs",
            "unpickled": root / "unpickled"}


class Unpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("stages, override, culprits", [
    ("sft", "sft.data.train=/nonexistent/train.jsonl", ["sft.data.train", "/nonexistent/train.jsonl", "not found"]),
    ("sft", "sft.input=/nonexistent/model", ["sft.input", "/nonexistent/model", "not found"]),
    ("pretrain", "pretrain.tokenizer=/nonexistent/tokenizer", ["pretrain.tokenizer", "/nonexistent/tokenizer"]),
    ("sft", "sft.input={no_weights}", ["sft.input", "{no_weights}", "no *.safetensors weights"]),
    ("sft", "sft.input={pickled}", ["sft.input", "{pickled}", "only pickle weights (pytorch_model.bin)"]),
    ("ppo", "ppo.reward_model={three_outputs}", ["ppo.reward_model", "{three_outputs}", "3 outputs"]),
], ids=["missing-data", "missing-model", "missing-tokenizer", "model-without-weights", "pickle-weights-only",
        "reward-model-3-outputs"])
def test_bad_path_is_refused_before_launch(run_dir, rlhf_here, bad_models, pretrained, stages, override, culprits):
    ppo = ["ppo.enabled=true", f"ppo.input={final_of(pretrained)}", "ppo.data.train=movie-reviews:ppo_train"]
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, stages, override.format(**bad_models), *(ppo if stages == "ppo" else [])))
    refused(result, *(c.format(**bad_models) for c in culprits))
    assert f"[{stages}] starting" not in result.stdout
    assert not (run_dir / stages / "logs").exists()
    assert_untouched(run_dir, before)


def test_hub_id_while_offline_is_refused_at_once(run_dir, rlhf_here):
    before = checkpoint_files(run_dir)
    for override, key in (("sft.input=some-org/some-model", "sft.input"),
                          ("sft.data.train=some-org/some-dataset", "sft.data.train")):
        started = time.monotonic()
        line = refused(rlhf_here(*run_args(run_dir, "sft", override)), key, override.split("=")[1])
        assert "offline" in line
        assert time.monotonic() - started < 20  # no waiting on a network that is not there
    assert not (run_dir / "sft" / "logs").exists()
    assert_untouched(run_dir, before)


# ---------------------------------------------------------------------------------------------------------------
# 3. data and models: the stage stops before training


LONG = " ".join(["great"] * 300)


@pytest.mark.parametrize("name, content, culprit, in_stage", [
    ("wrong-type", [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "d"}],
     "row 2: field 'prompt' must be a string or a list of turns, got int", True),
    ("blank-file", "\n  \n\n", "file is empty", False),  # the first row is checked before anything launches
    ("broken-json", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", oops}\n', "line 2: not valid JSON", True),
], ids=["wrong-type", "blank-file", "broken-json"])
def test_bad_data_stops_the_stage(run_dir, rlhf_here, tmp_path, name, content, culprit, in_stage):
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(path, content) if isinstance(content, list) else path.write_text(content)
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, "sft", f"sft.data.train={path}"))
    refused(result, *(["stage 'sft' failed"] if in_stage else []), str(path), culprit)
    assert not (run_dir / "sft" / "final").exists() and not complete_checkpoints(run_dir / "sft")
    assert_untouched(run_dir, before)


def test_max_length_shorter_than_every_prompt_is_refused(run_dir, rlhf_here):
    before = checkpoint_files(run_dir)
    refused(rlhf_here(*run_args(run_dir, "sft", "sft.max_length=4")), "sft.max_length", "every train prompt fills")
    assert not (run_dir / "sft" / "final").exists()
    assert_untouched(run_dir, before)


def test_prompts_filling_the_context_are_refused(run_dir, rlhf_here, tmp_path, pretrained):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": LONG, "chosen": "good", "rejected": "bad"}] * 4)
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, "reward", f"reward.input={final_of(pretrained)}",
                                 f"reward.data.train={data}"))
    refused(result, "reward.max_length", "all 4 train pairs are longer than 128 tokens")
    assert not (run_dir / "reward" / "final").exists()
    assert_untouched(run_dir, before)


def _more_tokens(tokenizer) -> None:
    tokenizer.add_tokens(["<extra-1>", "<extra-2>", "<extra-3>"])


def _no_template(tokenizer) -> None:
    tokenizer.chat_template = None


@pytest.mark.parametrize("edit, data, culprits", [
    (_more_tokens, None, ["tokenizer has 403 tokens", "embeds only 400"]),
    (_no_template, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
     ["rows are chat turns", "has no chat template"]),
], ids=["vocab-above-embeddings", "no-chat-template"])
def test_model_tokenizer_mismatch_is_refused(run_dir, rlhf_here, tmp_path, pretrained, edit, data, culprits):
    model = model_variant(pretrained, tmp_path / "model", tokenizer_edit=edit)
    overrides = [f"sft.input={model}"] + ([f"sft.data.train={write_jsonl(tmp_path / 'chat.jsonl', data * 4)}"]
                                           if data else [])
    before = checkpoint_files(run_dir)
    line = refused(rlhf_here(*run_args(run_dir, "sft", *overrides)), "stage 'sft' failed", *culprits)
    assert str(model) in line
    assert not (run_dir / "sft" / "final").exists()
    assert_untouched(run_dir, before)


def test_interrupted_stage_of_another_config_is_not_resumed(pretrained, rlhf_here, tmp_path):
    run_dir = copy_run(pretrained, tmp_path / "run", interrupted=True)
    before = checkpoint_files(run_dir)
    refused(rlhf_here(*run_args(run_dir, "pretrain", "pretrain.lr=2e-3")), "checkpoint-5",
            "different config", "pretrain.lr: 0.001 -> 0.002")
    assert not (run_dir / "pretrain" / "final").exists()
    assert checkpoint_files(run_dir) == before


def test_traceback_only_with_debug(run_dir, rlhf_here, tmp_path):
    # row 1 is fine (checked before launch), row 2 is not: the stage process finds it
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    args = run_args(run_dir, "sft", f"sft.data.train={bad}")
    plain = rlhf_here(*args)
    refused(plain, "row 2: field 'completion' is missing")  # and no traceback
    debug = rlhf_here("--debug", *args)
    assert debug.code == 2 and "Traceback" in debug.stdout and "field 'completion' is missing" in debug.stderr
    before_launch = rlhf_here("--debug", *run_args(run_dir, "sft", "sft.lr=0"))
    assert before_launch.code == 2 and "Traceback" in before_launch.stderr
    assert before_launch.stderr.strip().splitlines()[-1].startswith("error: ")


# ---------------------------------------------------------------------------------------------------------------
# 4. security: pickle weights are never loaded


def test_pickle_weights_are_never_loaded(bad_models, rlhf_here, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A fine film\n")
    result = rlhf_here("generate", bad_models["pickled"], "--prompts", prompts)  # no preflight on this path
    refused(result, str(bad_models["pickled"]), "cannot load model")
    assert not bad_models["unpickled"].exists()
    for root in ("pipeline", "stages"):  # and no code of ours unpickles weights itself
        for path in (ROOT / root).rglob("*.py"):
            assert "torch.load(" not in path.read_text(), path
