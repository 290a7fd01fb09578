"""What `rlhf run` shows on the terminal: our own progress lines, while the DeepSpeed launcher's and the
libraries' output goes to the stage's logs/launch.log (all of it on the terminal with --verbose), and a
failed stage says why in one line with the log's path."""

from __future__ import annotations

import re

import pytest

from pipeline.launch import TerminalLines, stage_error
from tests.conftest import TINY, communicate

LAUNCHER_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] \[(INFO|WARNING)\]")


def test_terminal_keeps_our_lines_across_chunks_bars_and_split_characters():
    terminal = TerminalLines()
    review = "[sft] step 2/4 loss 5.938 — ok".encode()
    cut = review.index("—".encode()) + 1  # the chunk ends inside a multi-byte character
    shown = terminal.feed(b"[2026-11-29 16:09:13,552] [INFO] [launch.py:152:main] WORLD INFO\n" + review[:cut])
    shown += terminal.feed(review[cut:] + b"\n\r 50%|##| 2/4 [00:00<00:00, 8.42it/s][ppo] step 1/2 reward -0.1\n")
    shown += terminal.feed(b"error: from a rank\nFutureWarning: deprecated\n[ppox] not ours\n[eval] last")
    shown += terminal.rest()
    assert shown == ["[sft] step 2/4 loss 5.938 — ok", "[ppo] step 1/2 reward -0.1", "[eval] last"]


@pytest.mark.parametrize("log, line", [
    ("Traceback (most recent call last):\n  File \"x\"\nKeyError: 'prompt'\n", "KeyError: 'prompt'"),
    ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x\"\n[rank0]: AttributeError: 'NoneType' object "
     "has no attribute 'eval'\n", "AttributeError: 'NoneType' object has no attribute 'eval'"),
    ("50%|##| 2/4 [00:01, 3.1it/s]error: sft.data.train: a.jsonl: line 3: not valid JSON\n",
     "sft.data.train: a.jsonl: line 3: not valid JSON"),
    ("[2026-11-29 16:09:29,621] [ERROR] [launch.py:259:sigkill_handler] [...] exits with return code = -9\n",
     "a rank was killed by signal 9 (out of memory?)"),
    ("nothing that says why\n", None),
])
def test_a_failed_stage_is_explained_by_one_line_of_its_log(tmp_path, log, line):
    path = tmp_path / "launch.log"
    path.write_text("earlier launch: error: not this one\n" + log)
    assert stage_error(path, len("earlier launch: error: not this one\n")) == line


ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def rlhf(*args) -> tuple[int, str]:
    import os

    code, out, _ = communicate(("run", TINY, *args), {**os.environ, **ENV}, 600, merge_output=True)
    return code, out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("terminal") / "run"
    code, out = rlhf("--run-dir", run_dir, "--stages", "pretrain")
    assert code == 0, out[-3000:]
    return run_dir, out


@pytest.mark.slow
def test_terminal_shows_progress_and_the_log_keeps_the_launcher(pretrained):
    run_dir, out = pretrained
    assert not LAUNCHER_LINE.search(out) and "deepspeed_shm_comm_op" not in out
    lines = out.strip().splitlines()
    assert lines[0] == f"[pretrain] starting on 1 rank(s); log: {run_dir / 'pretrain' / 'logs' / 'launch.log'}"
    assert any(re.fullmatch(r"\[pretrain\] step \d+/6 loss \S+ .*s/step", line) for line in lines), out
    assert lines[-2].startswith("[pretrain] done in ") and lines[-1].startswith("pipeline finished; run dir: ")
    log = (run_dir / "pretrain" / "logs" / "launch.log").read_text()
    assert LAUNCHER_LINE.search(log) and "[pretrain] step 6/6 loss" in log


@pytest.mark.slow
def test_a_data_error_inside_a_stage_is_one_line_with_the_log(pretrained, tmp_path):
    run_dir, _ = pretrained
    data = tmp_path / "sft.jsonl"  # the first row passes the check before launch; line 3 fails in the stage
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e", x\n')
    log = run_dir / "sft" / "logs" / "launch.log"
    code, out = rlhf("--run-dir", run_dir, "--stages", "sft", f"sft.data.train={data}")
    assert code == 2, out[-3000:]
    assert out.strip().splitlines() == [
        f"[sft] starting on 1 rank(s); log: {log}",
        f"error: stage 'sft' failed: sft.data.train: {data}: line 3: not valid JSON (Expecting property name "
        f"enclosed in double quotes at column 17); log: {log}"]

    code, verbose = rlhf("--run-dir", run_dir, "--stages", "sft", f"sft.data.train={data}", "--verbose")
    assert code == 2 and LAUNCHER_LINE.search(verbose) and verbose.strip().splitlines()[-1] == out.strip().splitlines()[-1]


def test_only_extension_locks_no_live_process_holds_are_cleared(tmp_path, monkeypatch):
    """A build in progress keeps its lock open however long it takes (CPU Adam: minutes); a killed
    builder's lock is closed and goes."""
    import os
    import time

    from pipeline.launch import clear_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    locks = {name: tmp_path / "py311_cpu" / name / "lock" for name in ("building", "killed", "just_made")}
    for lock in locks.values():
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    hour_ago = time.time() - 3600
    for name in ("building", "killed"):
        os.utime(locks[name], (hour_ago, hour_ago))
    fd = os.open(locks["building"], os.O_RDONLY)  # as torch's FileBaton holds it while building
    try:
        assert clear_stale_extension_locks() == 1
    finally:
        os.close(fd)
    assert {name: lock.exists() for name, lock in locks.items()} == {"building": True, "killed": False,
                                                                     "just_made": True}
