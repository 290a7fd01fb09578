"""Build and run the DeepSpeed launcher command for one stage.

We never spawn ranks or set up networking ourselves: the command is DeepSpeed's own runner
(`deepspeed --num_gpus N [--hostfile H --num_nodes M] --module stages.worker ...`), so the
same stage scales from one CPU process to many GPU nodes, and Slurm users can call it too.

Two ways to span nodes, both DeepSpeed's: one `rlhf` on the first node whose launcher reaches the
others through the hostfile (pdsh/ssh), or the same `rlhf` command started once per node (by
`srun`, say) with `RLHF_NODE_RANK` set to that node's rank: each then starts DeepSpeed's launcher
for its own node only (`--no_ssh --node_rank N`), and only node 0 runs the orchestrator's side
(run dir, data, manifests, evaluation) while the others follow it stage by stage.
"""

from __future__ import annotations

import codecs
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.config import STAGE_ORDER, DeepSpeedSection
from pipeline.errors import UserError

NODE_RANK_ENV = "RLHF_NODE_RANK"
PER_NODE_FLAGS = ("--no_ssh", "--node_rank")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    if not gpu_build():
        return False
    import torch

    return torch.cuda.is_available()


def gpu_build() -> bool:
    """Whether the installed torch was built for CUDA or ROCm, read from its version.py without importing torch.

    Importing torch costs the orchestrator 2-3 s per `rlhf` command on a CPU machine (a CPU wheel says
    `cuda = None` and `hip = None` there); anything unexpected in the file counts as a GPU build, which
    then asks torch itself."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except (AttributeError, TypeError, OSError):
        return True
    return not all(re.search(rf"^{name}\s*(:[^=]*)?=\s*None\s*$", text, re.M) for name in ("cuda", "hip"))


def node_rank() -> int | None:
    """This node's rank when every node starts its own launcher (`RLHF_NODE_RANK`); None: one launcher for all."""
    value = os.environ.get(NODE_RANK_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise UserError(f"{NODE_RANK_ENV}={value}: must be this node's rank, 0 to the number of nodes - 1")
    return int(value)


def check_per_node(ds: DeepSpeedSection, node: int | None, key: str) -> None:
    """A per-node launch needs every node to agree on the rendezvous, so nothing may be picked per node."""
    given = [a for a in ds.launcher_args if a.split("=", 1)[0] in PER_NODE_FLAGS]
    if given:
        raise UserError(f"{key}.launcher_args: {given[0]} is set from {NODE_RANK_ENV} (start `rlhf` on each "
                        f"node with {NODE_RANK_ENV}=<node rank>), not given in the config")
    if node is None:
        return
    if node >= ds.num_nodes:
        raise UserError(f"{NODE_RANK_ENV}={node}: {key}.num_nodes is {ds.num_nodes}, so node ranks are "
                        f"0..{ds.num_nodes - 1}")
    if ds.num_nodes > 1:
        for name in ("master_addr", "master_port"):
            if getattr(ds, name) is None:
                raise UserError(f"{key}.{name}: required when each node starts its own launcher "
                                f"({NODE_RANK_ENV} is set); every node must name the same one")


def launcher_command(ds: DeepSpeedSection, run_dir: Path, stage: str, extra: list[str] | None = None,
                     node: int | None = None) -> list[str]:
    """DeepSpeed's runner for one stage: for all nodes, or with `node` for that node's ranks only."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if ds.hostfile:
        cmd += ["--hostfile", ds.hostfile, "--num_nodes", str(ds.num_nodes)]
    cmd += ["--num_gpus", str(ds.num_gpus)]
    if ds.master_addr:
        cmd += ["--master_addr", ds.master_addr]
    cmd += ["--master_port", str(ds.master_port or free_port())]
    cmd += list(ds.launcher_args)
    if node is not None:
        cmd += ["--no_ssh", "--node_rank", str(node)]
    cmd += ["--module", "stages.worker", "--run-dir", str(run_dir), "--stage", stage]
    return cmd + list(extra or [])


def launcher_env(ds: DeepSpeedSection) -> dict[str, str]:
    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env and not has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    if env.get("DS_ACCELERATOR") == "cpu" and "OMP_NUM_THREADS" not in env:
        # CPU ranks share the cores; more threads than cores per rank only thrash.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ds.num_gpus))
    if env.get("DS_ACCELERATOR") == "cpu":
        # Spinning OpenMP threads stall each other when any other process holds a core (measured 7x).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The worker must import this checkout's packages even when not pip-installed.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def _mapped_shm() -> set[str]:
    """Names of DeepSpeed shm buffers some live process still maps."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        names.update(part.rsplit("/", 1)[-1] for part in text.split() if SHM_PREFIX in part)
    return names


def release_shm(port: int | None = None, min_age_s: float = 60.0) -> int:
    """Delete DeepSpeed CPU all-reduce buffers (~70 MB per rank in /dev/shm) that no process uses.

    DeepSpeed's CPU backend creates them per launch and never unlinks them, so every stage launch
    (and every killed one) would keep RAM until the machine runs out. With `port`, only that
    finished launch's buffers go; without, any unmapped buffer older than `min_age_s`.
    """
    if not SHM_DIR.is_dir():
        return 0
    in_use, removed, now = _mapped_shm(), 0, time.time()
    for path in SHM_DIR.glob(f"{SHM_PREFIX}_*"):
        mine = port is not None and f"_{port}_" in path.name
        try:
            stale = port is None and now - path.stat().st_mtime > min_age_s
            if (mine or stale) and path.name not in in_use:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _open_files() -> set[str]:
    """Every path some live process holds open (its /proc/<pid>/fd links)."""
    held = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            held.add(os.readlink(fd))
        except OSError:
            continue
    return held


def clear_stale_extension_locks(min_age_s: float = 10.0) -> int:
    """Remove torch-extension build locks left by a process killed while holding one.

    Every rank takes `~/.cache/torch_extensions/*/<op>/lock` when it loads a DeepSpeed op (the CPU
    communication op at start-up, CPU Adam for offload: a build takes 30 s to several minutes); a rank
    killed meanwhile leaves the file and every later rank waits on it forever. torch's FileBaton keeps
    the lock file open while it builds, so a lock no live process holds open is such a leftover; one
    being built is never touched, however long the build takes.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    locks = list(root.glob("*/*/lock"))
    if not locks:
        return 0
    held, removed = _open_files(), 0
    for lock in locks:
        try:
            if str(lock.resolve()) not in held and time.time() - lock.stat().st_mtime > min_age_s:
                lock.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _watch_locks(stop: threading.Event) -> None:
    while not stop.wait(15.0):
        clear_stale_extension_locks()


VERBOSE_ENV = "RLHF_VERBOSE"


def verbose() -> bool:
    """`rlhf --verbose` (or `--debug`): the terminal shows everything the ranks and the launcher print."""
    return bool(os.environ.get(VERBOSE_ENV) or os.environ.get("RLHF_DEBUG"))


# Our own progress lines: `[sft] step 20/200 loss ...`, `[ppo] warning: ...`, `[eval] ...`. Found at
# the start of a line or right after a progress bar the rank was drawing (`... 4/6 [00:01, 3.1it/s]`).
OWN_LINE = re.compile(r"(?:^|(?<=\]))\[(?:%s|eval)\] .*" % "|".join(STAGE_ORDER))


class TerminalLines:
    """What of the launcher's output reaches the terminal: our own progress lines only.

    The DeepSpeed launcher's INFO/WARNING lines, library warnings and progress bars stay in the
    stage's log. A rank's `error: ...` line is left out too: the orchestrator prints it once, as
    the stage's failure, with the log path.
    """

    def __init__(self):
        self.partial = ""
        self.decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode  # a chunk may end mid-character

    def feed(self, chunk: bytes) -> list[str]:
        pieces = re.split(r"[\r\n]", self.partial + self.decode(chunk))
        self.partial = pieces.pop()  # no line end yet
        return [m.group(0) for piece in pieces if (m := OWN_LINE.search(piece))]

    def rest(self) -> list[str]:
        """At the end of the output: a last line printed without a line end."""
        return self.feed(b"\n") if self.partial else []


def run_launcher(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run the launcher: all of its output into `log_path`, and to the terminal everything
    (`--verbose`) or our own progress lines (`TerminalLines`)."""
    show_all = verbose()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        clear_stale_extension_locks()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        stop = threading.Event()
        threading.Thread(target=_watch_locks, args=(stop,), daemon=True).start()
        terminal = TerminalLines()
        try:
            # Raw chunks, not lines: progress bars redraw with '\r' and must show as they happen.
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.buffer.write(chunk)
                log.flush()
                if show_all:
                    sys.stdout.buffer.write(chunk)
                else:
                    lines = terminal.feed(chunk)
                    sys.stdout.write("".join(line + "\n" for line in lines))
                sys.stdout.flush()
            if not show_all:
                sys.stdout.write("".join(line + "\n" for line in terminal.rest()))
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            stop.set()
            log.flush()
        return proc.wait()


def stage_error(log: Path, offset: int) -> str | None:
    """The one line that says why the stage failed, from what this launch added to its log: a rank's own
    `error: ...`, else the last line of a traceback, else the signal that killed a rank."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    text = text.replace("\r", "\n")
    # at the start of a line, or right after a progress bar the rank was drawing (`... 4/6 [00:01, 3.1it/s]`)
    errors = re.findall(r"(?:^|(?<=\]))error: (.+)", text, flags=re.MULTILINE)
    if errors:
        return errors[-1].strip()
    # a crash: the last line of the rank's traceback, `SomeError: what`
    raised = re.findall(r"^(?:\[rank\d+\]: )?([A-Za-z_][\w.]*(?:Error|Exception)(?:: .+)?)$", text, flags=re.MULTILINE)
    if raised:
        return raised[-1].strip()
    killed = re.findall(r"exits with return code = -(\d+)", text)  # DeepSpeed's launcher on a signalled rank
    if killed:
        return f"a rank was killed by signal {killed[-1]}" + (" (out of memory?)" if killed[-1] == "9" else "")
    return None
