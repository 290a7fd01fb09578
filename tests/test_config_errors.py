"""Bad config files and values: each gets exactly one line naming the file and line, or the key, with the
nearest valid value where there is one. In process, before anything is read from a run dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, UserError

CASES = [  # (file contents as bytes, overrides, the exact message after "<file>")
    (b"run: {name: x\nsft:\n  lr: 1\n", [],
     ":1:6: YAML syntax error: a {...} mapping opened here is not closed (expected ',' or '}', but got ':' at line 2)"),
    (b"sft:\n  data: [a, b\n", [],
     ":2:9: YAML syntax error: a [...] list opened here is not closed (expected ',' or ']', but got '<stream end>' "
     "at line 3)"),
    (b'run: {name: "x}\n', [],
     ":1:13: YAML syntax error: a quoted scalar opened here is not closed (found unexpected end of stream at line 2)"),
    (b"sft:\n  lr: 1\nreward:\n  lr: 2\nsft:\n  lr: 3\n", [],
     ":5: key 'sft' is given twice (lines 1 and 5); the second would silently replace the first: keep one"),
    (b"sft:\n  lr: 1\n  max_steps: 2\n  lr: 3\n", [],
     ":4: key 'lr' is given twice (lines 2 and 4); the second would silently replace the first: keep one"),
    (b"run:\n  name: caf\xe9\n", [], ":2: not UTF-8 text (byte 0xe9); save the config as UTF-8"),
    (b"- a\n- b\n", [], ": top level must be a mapping of sections"),
    (b"ppo:\n  advantage_estimator: gea\n", [],
     ": ppo.advantage_estimator: got 'gea' (did you mean 'gae'?); allowed: 'gae', 'grpo', 'rloo', 'reinforce_pp'"),
    (b"", ["ppo.kl_estimator=k4"], ": ppo.kl_estimator: got 'k4'; allowed: 'k1', 'k2', 'k3'"),
    (b"", ["deepspeed.precision=bf61"],
     ": deepspeed.precision: got 'bf61' (did you mean 'bf16'?); allowed: 'auto', 'fp32', 'bf16', 'fp16'"),
    (b"", ["sft.data.format=mesages"],
     ": sft.data.format: must be one of auto, messages, prompt_completion, text (got 'mesages'; did you mean "
     "'messages'?)"),
    (b"", ["ppo.loss_agg=token_sum"],
     ": ppo.loss_agg: got 'token_sum' (did you mean 'token_mean'?); allowed: 'token_mean', 'seq_mean_token_sum'"),
    (b"", ["ppo.batch_size=8"], None),  # PPO reads no batch_size: an unknown key (checked below by prefix)
    (b"", ["ppo.advantage_estimator=grpo"],
     ": ppo.samples_per_prompt: must be >= 2 for advantage_estimator grpo (its baseline is the other samples of "
     "the same prompt; got 1)"),
]


@pytest.mark.parametrize("text, overrides, message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_config_gets_one_line(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    line = str(err.value)
    assert "\n" not in line
    if message is None:
        assert line.startswith(f"{path}: ppo.batch_size: unknown key"), line
    else:
        assert line == f"{path}{message}"


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"{tmp_path}: is a directory, not a config file"


@pytest.mark.parametrize("judge, message", [
    ("vadr", "eval.judge: 'vadr' (did you mean 'vader'?) is not 'vader', a 'module:callable', a reward-model dir "
             "or a hub id"),
    ("org/not-cached-model", "eval.judge: 'org/not-cached-model' is not a local path, not in the local hub cache, "
                             "and the Hugging Face hub is offline"),
    ("os:no_such_thing", "eval.judge: judge 'os:no_such_thing': module 'os' has no attribute 'no_such_thing'"),
])
def test_bad_judge_is_refused_in_one_line(monkeypatch, judge, message):
    from pipeline.evaluation.judges import check_judge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        check_judge(judge)
    assert str(err.value) == message


def test_the_optimised_reward_model_is_no_judge(tmp_path: Path):
    from pipeline.evaluation.judges import check_judge

    (tmp_path / "rm").mkdir()
    with pytest.raises(UserError, match="is the reward model PPO optimised"):
        check_judge(str(tmp_path / "rm"), tmp_path / "rm")


def test_an_override_without_equals_gets_one_line(tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "configs/demo.yaml", "--run-dir", str(tmp_path / "run"), "ppo.max_steps", "3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: 'ppo.max_steps': an override must look like key.sub=value "
                                       "(e.g. ppo.max_steps=10)\n")
    assert not (tmp_path / "run").exists()
