"""The value side: where the critic and the reward model run, in this process or in a second one beside
one CPU rank. The PPO loop makes the same calls either way (`ValueSide`):

    values.score(rollout, meanwhile)   the critic's values and the reward model's scores, while
                                       `meanwhile` (the actor's and the reference's scoring) runs here
    values.update(batches, clip, meanwhile)   the critic's steps of one update, while `meanwhile`
                                       (the actor's steps) runs here
    values.call(fn, *args)             fn(models, *args) where the value models are (checkpoints, reports)

- `InProcess` (every GPU setup, every multi-rank or ZeRO 1-3 run): the value side's work runs here,
  first, then `meanwhile`.
- `ValueProcess` (one CPU rank under ZeRO-0): a spawned process builds the critic and the reward
  model exactly as `build_value_models` does here, then runs the work it is sent, in order, while
  this process runs `meanwhile` on half of the cores. Their work is independent of the actor's until
  the advantages, so the two cores each take one half.

A second thread instead of a process shares the GIL: both halves are HF modules run op by op from
Python, and each waits for the other's Python between its kernels. Measured on 2 cores, 4 update
epochs of the benchmark's actor and critic: 100 ms one after the other, 68 ms on two threads, 58 ms
in two processes (the actor's 4 epochs alone: 53 ms).

Under ZeRO-0 the critic's engine in the other process is an ordinary DeepSpeed engine on its own
one-rank gloo group; its checkpoints are the same files (`RemoteEngine` forwards the calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import traceback
from typing import Any, Callable, Iterator, Protocol, TypeVar

import torch

from pipeline.context import StageContext
from pipeline.errors import UserError
from stages.ppo.experience import Rollout, value_scores
from stages.ppo.update import CriticBatch, critic_steps

T = TypeVar("T")
ValueScores = tuple[torch.Tensor, torch.Tensor]  # critic values [B, T] (zeros without a critic), raw scores [B]


class ValueSide(Protocol):
    """What the PPO loop asks of the critic and the reward model, wherever they run."""

    def score(self, r: Rollout, meanwhile: Callable[[], T]) -> tuple[ValueScores, T]: ...
    def update(self, batches: list[CriticBatch], clip_range_value: float,
               meanwhile: Callable[[], T]) -> tuple[list[dict[str, float]], T]: ...
    def call(self, fn: Callable, *args: Any) -> Any: ...
    def close(self) -> None: ...


class InProcess:
    """The critic and reward model are in `models`, here: their work runs first, then `meanwhile`."""

    def __init__(self, models):
        self.models = models

    def score(self, r: Rollout, meanwhile: Callable[[], T]) -> tuple[ValueScores, T]:
        return value_scores(self.models, r), meanwhile()

    def update(self, batches: list[CriticBatch], clip_range_value: float,
               meanwhile: Callable[[], T]) -> tuple[list[dict[str, float]], T]:
        return critic_steps(self.models, batches, clip_range_value), meanwhile()

    def call(self, fn: Callable, *args: Any) -> Any:
        return fn(self.models, *args)

    def close(self) -> None:
        pass


def wants_value_process(ctx: StageContext, zero_stages: tuple[int, int]) -> bool:
    """One CPU rank with the actor and critic under ZeRO-0: a second process has a core to itself and
    no collectives to order against this one's."""
    return ctx.world_size == 1 and ctx.device == "cpu" and zero_stages == (0, 0)


class Pending:
    def __init__(self, process: "ValueProcess", number: int):
        self.process, self.number = process, number

    def result(self) -> Any:
        return self.process.result(self.number)


class ValueProcess:
    """The critic and reward model in a spawned process; their work runs there in the order sent."""

    def __init__(self, ctx: StageContext, tokenizer, total_updates: int, threads: int):
        import multiprocessing

        from pipeline.launch import free_port

        spawn = multiprocessing.get_context("spawn")
        self.conn, child_conn = spawn.Pipe()
        child_ctx = dataclasses.replace(ctx, tracker=None)  # the tracker stays here, with its run
        self.proc = spawn.Process(target=serve, name="ppo-value-models", daemon=True,
                                  args=(child_conn, child_ctx, tokenizer, total_updates, threads, free_port()))
        self.proc.start()
        child_conn.close()
        self.sent, self.received = 1, 0  # call 1 is the build, sent with the arguments
        self.replies: dict[int, tuple[bool, Any]] = {}
        self.critic = RemoteEngine(self)

    def score(self, r: Rollout, meanwhile: Callable[[], T]) -> tuple[ValueScores, T]:
        there = self.submit(value_scores, r)
        with self.half_the_cores():
            here = meanwhile()
        return there.result(), here

    def update(self, batches: list[CriticBatch], clip_range_value: float,
               meanwhile: Callable[[], T]) -> tuple[list[dict[str, float]], T]:
        there = self.submit(critic_steps, batches, clip_range_value)
        with self.half_the_cores():
            here = meanwhile()
        return there.result(), here

    def call(self, fn: Callable, *args: Any) -> Any:
        return self.submit(fn, *args).result()

    @contextlib.contextmanager
    def half_the_cores(self) -> Iterator[None]:
        """While the value process works beside this one, this one uses half of the intra-op threads."""
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // 2))
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def submit(self, fn: Callable, *args: Any) -> Pending:
        self.conn.send_bytes(pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL))
        self.sent += 1
        return Pending(self, self.sent)

    def result(self, number: int) -> Any:
        while self.received < number:
            try:
                reply = pickle.loads(self.conn.recv_bytes())
            except (EOFError, ConnectionError):
                self.proc.join(timeout=5)
                raise RuntimeError(f"ppo: the critic and reward model process died (exit code "
                                   f"{self.proc.exitcode}); see the messages above") from None
            self.received += 1
            self.replies[self.received] = reply
        ok, value = self.replies.pop(number)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send_bytes(pickle.dumps(None))
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


class RemoteEngine:
    """The critic's engine as the checkpoint code sees it: save and load run in the value process."""

    def __init__(self, process: ValueProcess):
        self.process = process

    def save_checkpoint(self, path: str, tag: str) -> None:
        self.process.call(save_critic, path, tag)

    def load_checkpoint(self, path: str, tag: str) -> tuple[str | None, None]:
        return self.process.call(load_critic, path, tag), None


def save_critic(models, path: str, tag: str) -> None:
    models.critic.save_checkpoint(path, tag=tag)


def load_critic(models, path: str, tag: str) -> str | None:
    return models.critic.load_checkpoint(path, tag=tag)[0]


def value_sharding(models) -> dict[str, Any]:
    from pipeline import sharding

    return sharding.report({"critic": models.critic, "reward": models.reward})


def critic_state(models) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in models.critic.module.state_dict().items()}


def _portable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling (UserError, OSError...), else its traceback as text."""
    if isinstance(err, UserError):
        return err
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError("".join(traceback.format_exception(err)))


def serve(conn, ctx: StageContext, tokenizer, total_updates: int, threads: int, port: int) -> None:
    """The value process: build the critic and reward model, then run calls until told to stop."""
    with _own_process_group(port):
        torch.set_num_threads(threads)
        reply: tuple[bool, Any]
        try:
            models = _build(ctx, tokenizer, total_updates)
            reply = (True, None)
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the PPO loop
            models, reply = None, (False, _portable(err))
        conn.send_bytes(pickle.dumps(reply))
        while models is not None:
            try:
                request = pickle.loads(conn.recv_bytes())
            except (EOFError, ConnectionError):  # the PPO loop is gone
                return
            if request is None:
                return
            fn, args = request
            try:
                reply = (True, fn(models, *args))
            except BaseException as err:  # noqa: BLE001
                reply = (False, _portable(err))
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def _build(ctx: StageContext, tokenizer, total_updates: int):
    import transformers

    from stages.ppo.engines import PPOModels, build_value_models

    transformers.set_seed(ctx.config.run.seed)  # a fresh critic head is initialised the same every run
    critic, reward = build_value_models(ctx, tokenizer, total_updates)
    critic.eval()  # no dropout: the values of the update must match those of the scoring
    return PPOModels(actor=None, critic=critic, reference=None, reward=reward, uses_lora=False)


@contextlib.contextmanager
def _own_process_group(port: int) -> Iterator[None]:
    """A one-rank gloo group of the value process's own (DeepSpeed engines need one)."""
    import torch.distributed as dist

    from pipeline.worker import init_distributed

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    init_distributed()
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
