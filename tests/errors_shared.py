"""What the error tests share (tests/test_errors.py and tests/test_errors_training.py load it as a plugin, so
both get the same fixtures): one tiny pretraining run made once per test process, copies of it, `rlhf` in this
process with each stage's worker run here as well, and the checks every refusal gets: exit code 2, one `error:`
line naming the culprits, no traceback, and the run dir's checkpoints byte for byte as they were (sha256 of every
file in `*/final/` and `*/checkpoint-*/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.checkpoint import complete_checkpoints
from tests.conftest import RLHF, ROOT, TINY, destroy_process_group
from tests.inprocess import launcher_in_process

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
# the real CLI and launcher, in subprocesses


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


# ---------------------------------------------------------------------------------------------------------------
# the shared tiny pretraining run, and copies of it

# A checkpoint every step, a log every 5: a resumed Trainer keeps these (they are in trainer_state.json), so
# the failures in tests/test_errors_training.py happen at step 6, which saves but does not log. Neither
# changes the config hash.
SHARED = ("pretrain.save_steps=1", "pretrain.logging_steps=5")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> tuple[Path, Result]:
    """tiny.yaml's pretraining (final/, checkpoint-5/, checkpoint-6/), run with secrets in the environment.

    Made once per test process (each xdist worker), however many modules use it: tests read it or copy it.
    """
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
    """The environment a launched rank gets, for running stage workers here.

    The libraries are imported now, outside any test's output capture, so their loggers bind to the
    session's streams. Afterwards: no process group, and the environment and library state as they were.
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


@pytest.fixture
def rlhf_here(stage_process, monkeypatch, capsys):
    """`rlhf ARGS` in this process -> Result; a stage's own output (its launch log) is part of `stdout`.

    Each stage runs as a launched rank would (tests/inprocess.py, `as_launcher`): its refusal is its exit
    code and its `error:` line in the launch log, which the orchestrator then reports.
    """
    from pipeline import cli

    monkeypatch.setenv("RLHF_DEBUG", "")  # `--debug` sets it: restored after the test

    def call(*args: str | Path) -> Result:
        capsys.readouterr()
        with launcher_in_process(as_launcher=True), pytest.raises(SystemExit) as info:
            cli.main([str(a) for a in args])
        out = capsys.readouterr()
        logs = "".join(p.read_text() for p in Path(args[args.index("--run-dir") + 1]).glob("*/logs/launch.log")) \
            if "--run-dir" in args else ""
        return Result(info.value.code, out.out + logs, out.err)

    return call


def run_args(run_dir: Path, stages: str, *overrides: str) -> list[str | Path]:
    return ["run", TINY, "--run-dir", run_dir, "--stages", stages, *overrides]
