"""What the tracker leaves on disk when things go wrong: a resumed stage's metrics.jsonl, and W&B
out of reach. No launch, no W&B server: wandb is replaced by a recorder where its calls matter."""

from __future__ import annotations

import json
import socket
import sys
from types import SimpleNamespace

from pipeline.config import TrackingSection
from pipeline.tracking import MetricsFile, make_tracker, wandb_reachable


def steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resumed_stage_keeps_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    killed = MetricsFile(path)  # checkpoint at step 2, killed after logging step 4 and half of step 5
    for step in (1, 2, 3, 4):
        killed.write({"loss": float(step)}, step)
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')
    resumed = MetricsFile(path)  # resumes from checkpoint-2: logs 3, 4, 5 again
    for step in (3, 4, 5):
        resumed.write({"loss": 10.0 + step}, step)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 13.0, 14.0, 15.0]  # the resumed run's values


def test_a_stage_started_over_forgets_the_old_rows_but_not_unstepped_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    old = MetricsFile(path)
    old.write({"eval/win_rate": 0.5}, None)
    for step in (1, 2, 3):
        old.write({"loss": 1.0}, step)
    MetricsFile(path).write({"loss": 2.0}, 1)
    assert steps(path) == [None, 1]


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: a connect is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reachability_probe_tells_a_listening_server_from_a_closed_port(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_reachable() is None
    port = closed_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    assert wandb_reachable() == f"127.0.0.1:{port} unreachable: Connection refused"


class Recorder:
    """wandb.init as a list of the modes it was asked for; the run it returns records nothing."""

    def __init__(self, tmp_path):
        self.modes: list[str] = []
        self.dir = str(tmp_path / "wandb" / "offline-run-x" / "files")

    def init(self, mode, **settings):
        self.modes.append(mode)
        return SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None, summary={}, dir=self.dir)


def test_unreachable_wandb_starts_offline_without_trying_online(tmp_path, monkeypatch, capsys):
    wandb = Recorder(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=wandb.init, Settings=lambda **kw: kw))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    tracker = make_tracker(TrackingSection(mode="online"), rank=0, run_name="tiny", stage="sft",
                           stage_dir=tmp_path, config={})
    assert wandb.modes == ["offline"] and tracker.mode == "offline"  # wandb's own online wait never starts
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("[sft] warning: W&B 127.0.0.1:") and warning.endswith("; logging offline instead")
    tracker.log({"train/loss": 1.0}, step=1)
    assert steps(tmp_path / "metrics.jsonl") == [1]


def test_reachable_wandb_starts_online(tmp_path, monkeypatch):
    wandb = Recorder(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=wandb.init, Settings=lambda **kw: kw))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        tracker = make_tracker(TrackingSection(mode="online"), rank=0, run_name="tiny", stage="sft",
                               stage_dir=tmp_path, config={})
    assert wandb.modes == ["online"] and tracker.mode == "online"
