"""Commands given a path or input that is not what they need: one line, exit 2, before any work, and nothing
left behind (no run dir, no config.yaml, no report, no temp file). In process: none of these launches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT

DEMO = str(ROOT / "configs" / "demo.yaml")


def refused(capsys, argv: list[str]) -> str:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):].rstrip("\n")


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working dir with a file, a folder that is no run dir, and a run dir with only a final checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Path("afile").write_text("x")
    Path("notrun").mkdir()
    Path("run/pretrain/final").mkdir(parents=True)
    Path("run/config.yaml").write_text(Path(DEMO).read_text())
    Path("q.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    Path("p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    return tmp_path


def before(place: Path) -> set[str]:
    return {str(p.relative_to(place)) for p in place.rglob("*")}


CASES = [
    (["run", DEMO, "--run-dir", "afile"], "--run-dir: afile is a file, not a directory"),
    (["run", DEMO, "--run-dir", "afile/sub"], "--run-dir: afile is a file, so afile/sub cannot be created"),
    (["run", DEMO, "--run-dir", "new", "ppo.data.train=/nope/p.jsonl"],
     "ppo.data.train: data file not found: /nope/p.jsonl"),
    (["run", DEMO, "--run-dir", "new", "ppo.data.train=q.jsonl"],
     "q.jsonl: row 1: no ppo format fits the fields (question); expected `prompt` or `messages` "
     "(rename with ppo.data.columns)"),
    (["run", DEMO, "--run-dir", "new", "sft.data.train=p.jsonl"], "p.jsonl: row 1: field 'completion' is missing "
                                                                   "(format 'prompt_completion')"),
    (["run", DEMO, "--run-dir", "new", "eval.prompts=/nope/e.jsonl"], "eval.prompts: data file not found: /nope/e.jsonl"),
    (["run", DEMO, "--run-dir", "new", "eval.judge=vadr"],
     "eval.judge: 'vadr' (did you mean 'vader'?) is not 'vader', a 'module:callable', a reward-model dir or a hub id"),
    (["run", DEMO, "--run-dir", "new", "sft.input=/nope/model"], "sft.input: path not found: /nope/model"),
    (["run", DEMO, "--run-dir", "new", "--stages", "pretrain,sft,ppo"],  # no stage of this command makes it
     "ppo.reward_model is not set and stage 'reward' has no completed checkpoint in new/reward/final; run 'reward' "
     "first or set ppo.reward_model"),
    (["run", DEMO, "--run-dir", "run", "eval.judge=vadr"],  # an existing run dir: its config.yaml is kept
     "eval.judge: 'vadr' (did you mean 'vader'?) is not 'vader', a 'module:callable', a reward-model dir or a hub id"),
    (["status", "notrun"], "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    (["status", "afile"], "afile: is a file, not a run dir"),
    (["status", "missing"], "missing: run dir not found"),
    (["report", "notrun"], "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    (["eval", "notrun"], "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    (["resume", "notrun"], "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    (["resume", "run", "--stage", "pretrain", "--from", "run/pretrain/final"],
     "--from: run/pretrain/final is not a checkpoint of stage 'pretrain' of this run (expected "
     "run/pretrain/checkpoint-N)"),
    (["resume", "run", "--from", "run/pretrain/final"], "--from needs --stage (which stage the checkpoint belongs to)"),
    (["generate", "run/pretrain/final", "--prompts", "p.jsonl", "--out", "notrun"],
     "--out: notrun is a directory; give a file path such as notrun/responses.jsonl"),
    (["generate", "run/pretrain/final", "--prompts", "p.jsonl", "--out", "nodir/out.jsonl"],
     "--out: directory nodir does not exist"),
]


@pytest.mark.parametrize("argv, line", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_refused_in_one_line_leaving_nothing(place, capsys, argv, line):
    config_before = Path("run/config.yaml").read_text()
    files = before(place)
    assert refused(capsys, argv) == line
    assert before(place) == files  # no run dir, config, report, lock or temp file
    assert Path("run/config.yaml").read_text() == config_before
