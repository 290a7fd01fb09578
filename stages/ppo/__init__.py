"""PPO: actor, critic, reference and reward model as DeepSpeed engines, in our own loop."""

from stages.ppo.trainer import run

__all__ = ["run"]
