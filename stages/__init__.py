"""The four stages, in pipeline order. Each module offers `run(ctx) -> metrics`."""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES = {
    "pretrain": "stages.pretrain",
    "sft": "stages.sft",
    "reward": "stages.reward",
    "ppo": "stages.ppo",
}


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(STAGES[name])
