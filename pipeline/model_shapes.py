"""Parameter counts of the models a pipeline will train, from model configs alone: no weights are read.

A model is built on the meta device (shapes only, no memory) from its `config.json`, or, when
pretraining makes it from scratch, from `pretrain.model` the way `pipeline.models.build_model` does.
Which config each stage starts from follows the run's own rules (pipeline.rundir.stage_inputs): the
path the config names, else the producing stage's final checkpoint in the run dir, else, when that
stage has not run yet, the producer's own starting shape (every stage keeps the architecture).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checkpoint import MANIFEST, read_json
from pipeline.config import LoraSection, ModelArch, PipelineConfig
from pipeline.errors import UserError
from pipeline.memory import lora_parameters
from pipeline.rundir import RunDir

CAUSAL_LM, SEQ_CLS = "causal_lm", "seq_cls"
# (config key naming the input, the stage whose final checkpoint is the default)
UPSTREAM = {("sft", "input"): "pretrain", ("reward", "input"): "sft", ("ppo", "input"): "sft",
            ("ppo", "reward_model"): "reward"}


@dataclass(frozen=True)
class ModelSource:
    config: Any  # a transformers PretrainedConfig: shapes only
    origin: str  # where the shape came from, as the plan prints it
    root: str = ""  # for a stage not run yet: the config its shape was taken from

    def __post_init__(self) -> None:
        if not self.root:
            object.__setattr__(self, "root", self.origin)


@dataclass(frozen=True)
class ModelCount:
    params_total: int
    trainable_total: int


def read_config(source: str, key: str, trust_remote_code: bool):
    """config.json of a local checkpoint dir or a hub id (offline: only from the Hugging Face cache)."""
    from transformers import AutoConfig

    local = Path(source).expanduser()
    if not local.exists() and source.startswith((".", "/", "~")):
        raise UserError(f"{key}: path not found: {source}")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else source,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: cannot read the model config of {source} ({str(err).splitlines()[0]}); "
                        "pass a local dir holding its config.json") from None


def scratch_config(arch: ModelArch, vocab_size: int):
    """The LlamaConfig `build_model` makes (the fields that shape parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                       num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
                       intermediate_size=arch.intermediate_size,
                       max_position_embeddings=arch.max_position_embeddings,
                       tie_word_embeddings=arch.tie_word_embeddings)


def pretrain_source(cfg: PipelineConfig) -> ModelSource:
    trust = cfg.run.trust_remote_code
    if cfg.pretrain.input:
        return ModelSource(read_config(cfg.pretrain.input, "pretrain.input", trust),
                           f"pretrain.input = {cfg.pretrain.input}")
    if cfg.pretrain.tokenizer:
        from transformers import AutoTokenizer

        try:  # tokenizer files only; its size is the model's vocabulary
            vocab = len(AutoTokenizer.from_pretrained(cfg.pretrain.tokenizer, trust_remote_code=trust))
        except (OSError, ValueError) as err:
            raise UserError(f"pretrain.tokenizer: cannot read {cfg.pretrain.tokenizer} "
                            f"({str(err).splitlines()[0]})") from None
        origin = f"pretrain.model, vocab {vocab} (pretrain.tokenizer)"
    else:
        # The BPE trainer's size includes the special tokens; on little data it can stop short of it.
        vocab = cfg.pretrain.tokenizer_vocab_size
        origin = f"pretrain.model, vocab <= {vocab} (pretrain.tokenizer_vocab_size)"
    return ModelSource(scratch_config(cfg.pretrain.model, vocab), f"built from {origin}", origin)


def finished_checkpoint(run_dir: RunDir, stage: str) -> Path | None:
    """The stage's completed hand-off, found without writing: `rundir.completed_final` would first
    finish a publish cut off between its renames (bring back `final.previous`), possibly under a live run."""
    final = run_dir.final_dir(stage)
    for path in (final, final.with_name(f"{final.name}.previous")):
        manifest = read_json(path / MANIFEST)
        if isinstance(manifest, dict) and manifest.get("status") == "complete":
            return path
    return None


def stage_source(cfg: PipelineConfig, stage: str, key: str, run_dir: RunDir) -> ModelSource:
    """The model `stage` reads through config key `key` (`input`, or PPO's `reward_model`/`critic`)."""
    if stage == "pretrain":
        return pretrain_source(cfg)
    given = getattr(cfg.stage(stage), key)
    if given:
        return ModelSource(read_config(given, f"{stage}.{key}", cfg.run.trust_remote_code), f"{stage}.{key} = {given}")
    if key == "critic":  # the run's default: the critic starts from the reward model
        reward = stage_source(cfg, "ppo", "reward_model", run_dir)
        return ModelSource(reward.config, f"as the reward model, {reward.origin}", reward.root)
    producer = UPSTREAM[(stage, key)]
    final = finished_checkpoint(run_dir, producer)
    if final is not None:
        return ModelSource(read_config(str(final), f"{stage}.{key}", cfg.run.trust_remote_code),
                           f"{producer}'s checkpoint {final}")
    if not cfg.stage(producer).enabled:
        raise UserError(f"{stage}.{key} is not set, stage '{producer}' is disabled and "
                        f"{run_dir.final_dir(producer)} holds no completed checkpoint; set {stage}.{key}")
    before = stage_source(cfg, producer, "input", run_dir)
    return ModelSource(before.config, f"{producer}'s output, not made yet: same shape as {before.root}", before.root)


def meta_model(config, kind: str, trust_remote_code: bool = False):
    """The model with every tensor on the meta device: shapes, no memory. A seq_cls model has one output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == SEQ_CLS:
        config = copy.deepcopy(config)
        config.num_labels = 1
    cls = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModelForSequenceClassification
    with torch.device("meta"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)


def targeted_linears(model, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of every Linear whose last name part is a LoRA target, as peft matches them."""
    import torch

    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def count_parameters(model, kind: str, lora: LoraSection | None, key: str) -> ModelCount:
    """Whole and trainable parameters (tied weights once, as DeepSpeed holds them) with or without LoRA."""
    total = sum(p.numel() for p in model.parameters())
    if lora is None:
        return ModelCount(total, total)
    from pipeline.lora import SCORE_HEAD, check_targets

    check_targets(model, lora, key)
    adapters = lora_parameters(targeted_linears(model, lora.target_modules), lora.r)
    # A reward model's new score head trains in full; peft keeps a trainable copy beside the original.
    head = sum(p.numel() for p in getattr(model, SCORE_HEAD).parameters()) if kind == SEQ_CLS else 0
    return ModelCount(total + adapters + head, adapters + head)


def model_count(source: ModelSource, kind: str, lora: LoraSection | None, key: str,
                trust_remote_code: bool = False) -> ModelCount:
    return count_parameters(meta_model(source.config, kind, trust_remote_code), kind, lora, key)
