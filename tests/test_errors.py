"""Bad input met with a trained model at hand: every case stops with a one-line error naming the culprit, exit
code 2, and leaves the run dir's checkpoints and manifests byte for byte as they were. A traceback appears only
with `--debug`. Bad input refused from the command line alone (configs, run dirs, data and model paths, other
commands' paths) is in the catalogue, tests/test_catalogue.py ("catalogue:" below: a case name there).

The cases run `rlhf` in this process (`pipeline.cli.main`) on a copy of one shared tiny pretraining run
(tests/errors_shared.py), with each stage's worker also run in this process instead of under the DeepSpeed
launcher (fixture `rlhf_here`): model dirs are refused before any stage starts; errors found inside a stage
(data, model/tokenizer, resume) go through the real stage code, the worker's exit code and the orchestrator's
report of it. Failures during training (NaN, a full disk) and the secrets check are in
tests/test_errors_training.py ("training::"); what needs no launch at all is in tests/test_errors_units.py
("units::").

Item -> test ("sft_reward.py::" etc.: a test in tests/test_sft_reward.py etc.):

Before training
- YAML syntax error (line, column) .... catalogue: yaml-colon-in-a-value, yaml-unclosed-*
- unknown key, nearest key suggested .. catalogue: unknown-key-override, unknown-key-in-file
- wrong type .......................... catalogue: wrong-type
- learning rate zero or negative ...... catalogue: lr-zero, lr-negative
- batch not dividing across ranks ..... catalogue: rollout-not-dividing-ranks, minibatch-not-dividing-ranks
- PPO minibatch above the rollout ..... catalogue: minibatch-above-rollout
- clip ranges <= 0 .................... catalogue: clip-range-zero, value-clip-negative
- gamma, lambda outside [0, 1] ........ catalogue: gamma-above-1, lambda-below-0
- max length shorter than the prompt .. test_max_length_shorter_than_every_prompt_is_refused
- missing model/tokenizer/data path ... catalogue: sft-data-missing, model-path-missing, tokenizer-path-missing
- unreadable model dir / data file .... test_bad_path_is_refused_before_launch[model-without-weights],
                                        test_bad_data_stops_the_stage[broken-json]
- hub id while offline, no hang ....... catalogue: model-hub-id-offline, data-hub-id-offline
- empty dataset ....................... catalogue: sft-data-blank, and [empty-file] of
                                        sft_reward.py::test_bad_data_stops_the_stage_naming_file_row_and_field
- rows missing a field, empty strings . [missing-field] and [empty-string] of the same
- wrong types in rows ................. test_bad_data_stops_the_stage[wrong-type]
- prompts filling the whole context ... test_prompts_filling_the_context_are_refused
- chosen == rejected (warn, count) .... units::test_identical_pairs_are_warned_about_with_a_count
- tokenizer larger than embeddings .... test_model_tokenizer_mismatch_is_refused[vocab-above-embeddings]
- no chat template where needed ....... test_model_tokenizer_mismatch_is_refused[no-chat-template]
- reward model with several outputs ... test_bad_path_is_refused_before_launch[reward-model-3-outputs],
                                        sft_reward.py::test_reward_refuses_a_classifier_with_several_outputs
- run dir of another run: name ........ catalogue: run-dir-of-another-run
- run dir of another run: config ...... test_interrupted_stage_of_another_config_is_not_resumed
During training ("training::": tests/test_errors_training.py)
- NaN/inf loss (step, last good) ..... training::test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint
- NaN/inf reward ...................... training::test_nan_reward_stops_ppo_naming_the_step_and_last_good_checkpoint
- disk full while saving ....... training::test_disk_full_while_saving_keeps_the_last_checkpoint_and_says_how_much
- tracker unreachable ................. units::test_unreachable_tracker_falls_back_to_offline_with_one_warning
- traceback only with --debug ......... test_traceback_only_with_debug (every refusal asserts none)
Security
- safetensors only, no pickle ......... test_pickle_weights_are_never_loaded, [pickle-weights-only] above
- trust_remote_code off by default .... units::test_remote_code_is_not_run_unless_configured
- secrets in no file or output ........ training::test_secrets_reach_no_file_or_output,
                                        tracking.py::test_api_key_reaches_no_file (the W&B run config too)
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from pipeline.checkpoint import complete_checkpoints
from tests.conftest import ROOT
from tests.errors_shared import (assert_untouched, checkpoint_files, copy_run, final_of, model_variant, refused,
                                 run_args, write_jsonl)

pytest_plugins = ["tests.errors_shared"]  # fixtures pretrained, run_dir, rlhf_here
pytestmark = pytest.mark.slow  # launches the CLI (in process) and stage workers: not in the fast tier


# ---------------------------------------------------------------------------------------------------------------
# 1. model dirs: refused before the stage launches


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
    ("sft", "sft.input={no_weights}", ["sft.input", "{no_weights}", "no *.safetensors weights"]),
    ("sft", "sft.input={pickled}", ["sft.input", "{pickled}", "only pickle weights (pytorch_model.bin)"]),
    ("ppo", "ppo.reward_model={three_outputs}", ["ppo.reward_model", "{three_outputs}", "3 outputs"]),
], ids=["model-without-weights", "pickle-weights-only", "reward-model-3-outputs"])
def test_bad_path_is_refused_before_launch(run_dir, rlhf_here, bad_models, pretrained, stages, override, culprits):
    ppo = ["ppo.enabled=true", f"ppo.input={final_of(pretrained)}", "ppo.data.train=movie-reviews:ppo_train"]
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, stages, override.format(**bad_models), *(ppo if stages == "ppo" else [])))
    refused(result, *(c.format(**bad_models) for c in culprits))
    assert f"[{stages}] starting" not in result.stdout
    assert not (run_dir / stages / "logs").exists()
    assert_untouched(run_dir, before)


# ---------------------------------------------------------------------------------------------------------------
# 2. data and models: the stage stops before training


LONG = " ".join(["great"] * 300)


@pytest.mark.parametrize("name, content, culprit", [  # row 1 is fine (checked before launch), row 2 is not
    ("wrong-type", [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "d"}],
     "row 2: field 'prompt' must be a string or a list of turns, got int"),
    ("broken-json", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", oops}\n', "line 2: not valid JSON"),
], ids=["wrong-type", "broken-json"])
def test_bad_data_stops_the_stage(run_dir, rlhf_here, tmp_path, name, content, culprit):
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(path, content) if isinstance(content, list) else path.write_text(content)
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, "sft", f"sft.data.train={path}"))
    refused(result, "stage 'sft' failed", str(path), culprit)
    assert not (run_dir / "sft" / "final").exists() and not complete_checkpoints(run_dir / "sft")
    assert_untouched(run_dir, before)


def test_max_length_shorter_than_every_prompt_is_refused(run_dir, rlhf_here):
    before = checkpoint_files(run_dir)
    refused(rlhf_here(*run_args(run_dir, "sft", "sft.max_length=4")), "sft.max_length", "every train prompt fills")
    assert not (run_dir / "sft" / "final").exists()
    assert_untouched(run_dir, before)


def test_rows_whose_prompt_fills_max_length_are_counted_not_dropped_silently(run_dir, rlhf_here, tmp_path):
    """TRL drops a row whose prompt leaves no room for its completion; the stage says how many, and its
    eval_rows counts the rows evaluated, not the rows given."""
    rows = [{"prompt": LONG, "completion": "fine"}] * 6 + [{"prompt": "Short one.", "completion": "fine"}] * 2
    data = write_jsonl(tmp_path / "mostly_long.jsonl", rows)
    result = rlhf_here(*run_args(run_dir, "sft", f"sft.data.train={data}", f"sft.data.eval={data}", "sft.max_steps=1"))
    assert result.code == 0, result.output[-3000:]
    for split in ("train", "eval"):
        assert (f"[sft] warning: 6 of 8 {split} rows left out: their prompt fills sft.max_length=64 tokens, "
                "leaving no completion to train on; raise sft.max_length to keep them") in result.output
    metrics = json.loads((run_dir / "sft" / "final" / "manifest.json").read_text())["metrics"]
    assert (metrics["train_rows"], metrics["train_sequences"], metrics["eval_rows"]) == (8, 2, 2)


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
    # found from config.json and the tokenizer before anything launches
    (_more_tokens, None, ["sft.input:", "its tokenizer has 403 tokens but its config.json vocab_size is 400"]),
    (_no_template, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
     ["sft.data.train", "rows are chat turns", "has no chat template"]),  # before the launch (preflight)
], ids=["vocab-above-embeddings", "no-chat-template"])
def test_model_tokenizer_mismatch_is_refused(run_dir, rlhf_here, tmp_path, pretrained, edit, data, culprits):
    model = model_variant(pretrained, tmp_path / "model", tokenizer_edit=edit)
    overrides = [f"sft.input={model}"] + ([f"sft.data.train={write_jsonl(tmp_path / 'chat.jsonl', data * 4)}"]
                                           if data else [])
    before = checkpoint_files(run_dir)
    line = refused(rlhf_here(*run_args(run_dir, "sft", *overrides)), *culprits)
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
# 3. security: pickle weights are never loaded


def test_pickle_weights_are_never_loaded(bad_models, rlhf_here, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A fine film\n")
    result = rlhf_here("generate", bad_models["pickled"], "--prompts", prompts)  # no preflight on this path
    refused(result, str(bad_models["pickled"]), "cannot load model")
    assert not bad_models["unpickled"].exists()
    for root in ("pipeline", "stages"):  # and no code of ours unpickles weights itself
        for path in (ROOT / root).rglob("*.py"):
            assert "torch.load(" not in path.read_text(), path
