"""The catalogue of bad input: each mistake a user makes (in a config, a run dir, a data file or a command),
the command that meets it, and the exact one line it gets on stderr. Every case also exits with code 2,
prints no traceback, starts no stage, and leaves every file and folder in its working dir as it was: no run
dir, config.yaml, report, log or temp file is written, and an existing run dir's config.yaml is kept.

Each case runs `rlhf` in this process (`pipeline.cli.main`), in a working dir of its own that holds:
  demo.yaml, tiny.yaml     configs/demo.yaml and tests/configs/tiny.yaml
  run/                     a run dir: demo.yaml as its config.yaml, and an (empty) run/pretrain/final/
  notrun/                  a folder that is no run dir
  afile                    a file
  q.jsonl, p.jsonl         one row each: {"question": "x"} and {"prompt": "hi"}
plus the case's own `files`. Nothing launches: each is refused before a stage would start.

Bad input found only inside a stage, or only with a trained model (pickle-only weights, a reward model
with several outputs, a chat template missing), is in tests/test_errors.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT, TINY

DEMO = ROOT / "configs" / "demo.yaml"


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # after `rlhf`, run in the case's working dir
    line: str  # the whole of stderr: `error: <line>`
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the working dir first
    make: Callable[[ExitStack], None] | None = None  # anything else the bad input needs (a held lock, a folder)

    def __str__(self) -> str:
        return self.name


def held_lock(stack: ExitStack) -> None:
    """Another `rlhf` holds run/.lock."""
    fd = os.open("run/.lock", os.O_RDWR | os.O_CREAT, 0o644)
    stack.callback(os.close, fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)


def parquet_pairs(name: str) -> None:
    """A parquet file of preference pairs whose columns are named good/bad."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p"], "good": ["g"], "bad": ["b"]}), name)


def small_models(stack: ExitStack) -> None:
    """model5/: a config.json of vocab_size 5 and (unread) weights; tok/: a tokenizer of 8 tokens; small/: both."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(8)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                        unk_token="w0")
    for folder in ("tok", "small"):
        tokenizer.save_pretrained(folder)
    for folder in ("model5", "small"):
        Path(folder).mkdir(exist_ok=True)
        Path(folder, "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 5}))
        Path(folder, "model.safetensors").write_bytes(b"")


def preference_splits(name: str) -> None:
    """A DatasetDict saved with save_to_disk whose splits are train_prefs and test_prefs (no `train`)."""
    import datasets

    pairs = datasets.Dataset.from_list([{"chosen": "good", "rejected": "bad"}])
    datasets.DatasetDict({"train_prefs": pairs, "test_prefs": pairs}).save_to_disk(name)


def model_dir(name: str, config: str, tokenizer: bool) -> Callable[[ExitStack], None]:
    """A model dir with this config.json text, (unread) safetensors weights, and a tokenizer or none."""
    def make(stack: ExitStack) -> None:
        Path(name).mkdir(parents=True)
        Path(name, "config.json").write_text(config)
        Path(name, "model.safetensors").write_bytes(b"")
        if tokenizer:
            small_models(stack)
            for file in Path("tok").iterdir():
                Path(name, file.name).write_bytes(file.read_bytes())
    return make


def checkpoint_of(world_size: int, lr: float) -> Callable[[ExitStack], None]:
    """run/pretrain/checkpoint-5, complete, saved by `world_size` ranks with pretrain.lr `lr` (demo: 1 and 0.002)."""
    def make(stack: ExitStack) -> None:
        from pipeline.config import load_config
        from pipeline.rundir import semantic_stage_config

        saved = {**semantic_stage_config(load_config("demo.yaml"), "pretrain"), "lr": lr}
        Path("run/pretrain/checkpoint-5").mkdir()
        Path("run/pretrain/checkpoint-5/rlhf_complete.json").write_text(json.dumps(
            {"step": 5, "world_size": world_size, "config_hash": "saved-before", "stage_config": saved}))
    return make


CASES = [
    # --- config files: syntax, duplicates, encoding, shape
    Case("yaml-unclosed-mapping", "run bad.yaml --run-dir new",
         "bad.yaml:1:6: YAML syntax error: a {...} mapping opened here is not closed (expected ',' or '}', but got "
         "':' at line 2)",
         files={"bad.yaml": b"run: {name: x\nsft:\n  lr: 1\n"}),
    Case("yaml-unclosed-list", "run bad.yaml --run-dir new",
         "bad.yaml:2:9: YAML syntax error: a [...] list opened here is not closed (expected ',' or ']', but got "
         "'<stream end>' at line 3)",
         files={"bad.yaml": b"sft:\n  data: [a, b\n"}),
    Case("yaml-unclosed-quote", "run bad.yaml --run-dir new",
         "bad.yaml:1:13: YAML syntax error: a quoted scalar opened here is not closed (found unexpected end of "
         "stream at line 2)",
         files={"bad.yaml": b'run: {name: "x}\n'}),
    Case("yaml-list-as-a-key", "run bad.yaml --run-dir new",
         "bad.yaml:1:1: a key must be a name, not a list", files={"bad.yaml": b"[run]: {name: x}\n"}),
    Case("yaml-mapping-as-a-key", "run bad.yaml --run-dir new",
         "bad.yaml:2:3: a key must be a name, not a mapping", files={"bad.yaml": b"pretrain:\n  {max_steps: 5}: 1\n"}),
    Case("yaml-colon-in-a-value", "run bad.yaml --run-dir new",
         "bad.yaml:3:13: YAML syntax error: mapping values are not allowed here",
         files={"bad.yaml": b"run: {name: x}\nsft:\n  lr: 1.0e-3: 2\n"}),
    Case("section-given-twice", "run bad.yaml --run-dir new",
         "bad.yaml:5: key 'sft' is given twice (lines 1 and 5); the second would silently replace the first: keep one",
         files={"bad.yaml": b"sft:\n  lr: 1\nreward:\n  lr: 2\nsft:\n  lr: 3\n"}),
    Case("key-given-twice", "run bad.yaml --run-dir new",
         "bad.yaml:4: key 'lr' is given twice (lines 2 and 4); the second would silently replace the first: keep one",
         files={"bad.yaml": b"sft:\n  lr: 1\n  max_steps: 2\n  lr: 3\n"}),
    Case("not-utf8", "run bad.yaml --run-dir new",
         "bad.yaml:2: not UTF-8 text (byte 0xe9); save the config as UTF-8",
         files={"bad.yaml": b"run:\n  name: caf\xe9\n"}),
    Case("top-level-list", "run bad.yaml --run-dir new", "bad.yaml: top level must be a mapping of sections",
         files={"bad.yaml": b"- a\n- b\n"}),
    Case("config-is-a-directory", "run notrun --run-dir new", "notrun: is a directory, not a config file"),
    Case("unknown-key-in-file", "run bad.yaml --run-dir run --stages pretrain",
         "bad.yaml: sft.lrr: unknown key (did you mean 'lr'?); valid keys: batch_size, data, deepspeed, enabled, "
         "eval_steps, grad_accum, input, keep_checkpoints, logging_steps, lora, lr, lr_scheduler, max_grad_norm, "
         "max_length, max_steps, packing, save_steps, warmup_steps, weight_decay",
         files={"bad.yaml": b"sft:\n  lrr: 0.1\n"}),
    # --- config values: unknown keys, types, ranges, enum-like fields
    Case("unknown-key-override", "run tiny.yaml --run-dir run --stages pretrain pretrain.max_stepz=3",
         "tiny.yaml: pretrain.max_stepz: unknown key (did you mean 'max_steps'?); valid keys: batch_size, data, "
         "deepspeed, enabled, eval_steps, grad_accum, input, keep_checkpoints, logging_steps, lr, lr_scheduler, "
         "max_grad_norm, max_steps, model, save_steps, seq_len, tokenizer, tokenizer_vocab_size, warmup_steps, "
         "weight_decay"),
    Case("ppo-reads-no-batch-size", "run tiny.yaml --run-dir new ppo.batch_size=8",
         "tiny.yaml: ppo.batch_size: unknown key (did you mean 'minibatch_size'?); valid keys: actor_deepspeed, "
         "adaptive_kl, advantage_estimator, center_reward, clip_range, clip_range_value, critic, critic_deepspeed, critic_lr, "
         "data, deepspeed, ema_decay, enabled, entropy_coef, gamma, grpo_scale_rewards, input, keep_checkpoints, kl_coef, "
         "kl_estimator, kl_horizon, kl_in, lam, logging_steps, lora, loss_agg, lr, lr_scheduler, max_grad_norm, "
         "max_new_tokens, max_prompt_length, max_steps, min_new_tokens, minibatch_size, missing_eos_penalty, "
         "normalize_reward, ppo_epochs, reward_clip, reward_model, rollout_batch_size, samples_per_prompt, "
         "sampling_seed, save_steps, target_kl, temperature, top_p, warmup_steps, weight_decay, whiten_advantages"),
    Case("override-without-equals", "run demo.yaml --run-dir new ppo.max_steps 3",
         "'ppo.max_steps': an override must look like key.sub=value (e.g. ppo.max_steps=10)"),
    Case("wrong-type", "run tiny.yaml --run-dir new --stages pretrain,sft pretrain.batch_size=four",
         "tiny.yaml: pretrain.batch_size: expected an integer, got 'four'"),
    Case("lr-zero", "run tiny.yaml --run-dir new --stages pretrain,sft sft.lr=0",
         "tiny.yaml: sft.lr: must be > 0 (got 0.0)"),
    Case("lr-negative", "run tiny.yaml --run-dir new --stages pretrain,sft reward.lr=-1e-4",
         "tiny.yaml: reward.lr: must be > 0 (got -0.0001)"),
    Case("rollout-not-dividing-ranks",
         "run tiny.yaml --run-dir new --stages pretrain,sft ppo.enabled=true deepspeed.num_gpus=3",
         "tiny.yaml: ppo.rollout_batch_size: must divide across 3 ranks (got 16)"),
    Case("minibatch-not-dividing-ranks", "run tiny.yaml --run-dir new --stages pretrain,sft ppo.enabled=true "
         "deepspeed.num_gpus=3 ppo.rollout_batch_size=24 ppo.minibatch_size=8",
         "tiny.yaml: ppo.minibatch_size: must divide across 3 ranks (got 8)"),
    Case("minibatch-above-rollout",
         "run tiny.yaml --run-dir new --stages pretrain,sft ppo.rollout_batch_size=8 ppo.minibatch_size=16",
         "tiny.yaml: ppo.minibatch_size: must be <= rollout_batch_size x samples_per_prompt (8)"),
    Case("warmup-on-a-constant-schedule", "run tiny.yaml --run-dir new sft.lr_scheduler=constant sft.warmup_steps=5",
         "tiny.yaml: sft.warmup_steps: the constant schedule has no warm-up; set sft.lr_scheduler: "
         "constant_with_warmup (or sft.warmup_steps: 0)"),
    Case("eval-steps-without-eval-data", "run tiny.yaml --run-dir new reward.eval_steps=1 reward.data.eval=null",
         "tiny.yaml: reward.eval_steps: evaluates on reward.data.eval, which is not set"),
    Case("clip-range-zero", "run tiny.yaml --run-dir new --stages pretrain,sft ppo.clip_range=0",
         "tiny.yaml: ppo.clip_range: must be > 0 (got 0.0)"),
    Case("value-clip-negative", "run tiny.yaml --run-dir new --stages pretrain,sft ppo.clip_range_value=-0.1",
         "tiny.yaml: ppo.clip_range_value: must be > 0 (got -0.1)"),
    Case("gamma-above-1", "run tiny.yaml --run-dir new --stages pretrain,sft ppo.gamma=1.5",
         "tiny.yaml: ppo.gamma: must be in [0, 1] (got 1.5)"),
    Case("lambda-below-0", "run tiny.yaml --run-dir new --stages pretrain,sft ppo.lam=-0.1",
         "tiny.yaml: ppo.lam: must be in [0, 1] (got -0.1)"),
    Case("grpo-one-sample", "run tiny.yaml --run-dir new ppo.advantage_estimator=grpo",
         "tiny.yaml: ppo.samples_per_prompt: must be >= 2 for advantage_estimator grpo (its baseline is the other "
         "samples of the same prompt; got 1)"),
    Case("estimator-typo", "run bad.yaml --run-dir new",
         "bad.yaml: ppo.advantage_estimator: got 'gea' (did you mean 'gae'?); allowed: 'gae', 'grpo', 'rloo', "
         "'reinforce_pp'",
         files={"bad.yaml": b"ppo:\n  advantage_estimator: gea\n"}),
    Case("kl-estimator-unknown", "run tiny.yaml --run-dir new ppo.kl_estimator=k4",
         "tiny.yaml: ppo.kl_estimator: got 'k4'; allowed: 'k1', 'k2', 'k3'"),
    Case("precision-typo", "run tiny.yaml --run-dir new deepspeed.precision=bf61",
         "tiny.yaml: deepspeed.precision: got 'bf61' (did you mean 'bf16'?); allowed: 'auto', 'fp32', 'bf16', 'fp16'"),
    Case("data-format-typo", "run tiny.yaml --run-dir new sft.data.format=mesages",
         "tiny.yaml: sft.data.format: must be one of auto, messages, prompt_completion, text (got 'mesages'; did you "
         "mean 'messages'?)"),
    Case("loss-agg-typo", "run tiny.yaml --run-dir new ppo.loss_agg=token_sum",
         "tiny.yaml: ppo.loss_agg: got 'token_sum' (did you mean 'token_mean'?); allowed: 'token_mean', "
         "'seq_mean_token_sum'"),
    Case("judge-typo", "run demo.yaml --run-dir new eval.judge=vadr",
         "eval.judge: 'vadr' (did you mean 'vader'?) is not 'vader', a 'module:callable', a reward-model dir or a "
         "hub id"),
    Case("judge-typo-existing-run", "run demo.yaml --run-dir run eval.judge=vadr",
         "eval.judge: 'vadr' (did you mean 'vader'?) is not 'vader', a 'module:callable', a reward-model dir or a "
         "hub id"),
    Case("judge-hub-id-offline", "run demo.yaml --run-dir new eval.judge=org/not-cached-model",
         "eval.judge: 'org/not-cached-model' is not a local path, not in the local hub cache, and the Hugging Face "
         "hub is offline"),
    Case("judge-callable-missing", "run demo.yaml --run-dir new eval.judge=os:no_such_thing",
         "eval.judge: judge 'os:no_such_thing': module 'os' has no attribute 'no_such_thing'"),
    Case("judge-is-the-optimised-rm", "run demo.yaml --run-dir new ppo.reward_model=rm eval.judge=rm",
         "eval.judge: rm is the reward model PPO optimised (rm); a judge must be independent of it: vader, another "
         "(gold) reward model, or module:callable",
         make=lambda stack: Path("rm").mkdir()),
    # --- run dirs
    Case("run-dir-is-a-file", "run demo.yaml --run-dir afile", "--run-dir: afile is a file, not a directory"),
    Case("run-dir-under-a-file", "run demo.yaml --run-dir afile/sub",
         "--run-dir: afile is a file, so afile/sub cannot be created"),
    Case("run-dir-of-another-run", "run demo.yaml --run-dir run --stages pretrain run.name=other",
         "run: run dir holds pipeline run 'demo', not 'other'; use another --run-dir"),
    Case("run-dir-in-use", "run demo.yaml --run-dir run --stages pretrain",
         "run: run dir is in use by another process; wait for it or use another --run-dir", make=held_lock),
    Case("stage-without-upstream", "run tiny.yaml --run-dir new --stages sft",
         "sft.input is not set and stage 'pretrain' has no completed checkpoint in new/pretrain/final; run "
         "'pretrain' first or set sft.input"),
    Case("ppo-without-reward-model", "run demo.yaml --run-dir new --stages pretrain,sft,ppo",
         "ppo.reward_model is not set and stage 'reward' has no completed checkpoint in new/reward/final; run "
         "'reward' first or set ppo.reward_model"),
    # --- data and model paths, first rows
    Case("sft-data-missing", "run tiny.yaml --run-dir new sft.data.train=/nonexistent/train.jsonl",
         "sft.data.train: data file not found: /nonexistent/train.jsonl"),
    Case("ppo-data-missing", "run demo.yaml --run-dir new ppo.data.train=/nope/p.jsonl",
         "ppo.data.train: data file not found: /nope/p.jsonl"),
    Case("ppo-data-fields-unknown", "run demo.yaml --run-dir new ppo.data.train=q.jsonl",
         "q.jsonl: row 1: no ppo format fits the fields (question); expected `prompt` or `messages` (rename with "
         "ppo.data.columns)"),
    Case("sft-row-missing-field", "run demo.yaml --run-dir new sft.data.train=p.jsonl",
         "p.jsonl: row 1: field 'completion' is missing (format 'prompt_completion')"),
    Case("sft-data-blank", "run tiny.yaml --run-dir new sft.data.train=blank.jsonl",
         "sft.data.train: blank.jsonl: file is empty",
         files={"blank.jsonl": "\n  \n\n"}),
    Case("sft-data-not-utf8", "run tiny.yaml --run-dir new sft.data.train=latin1.jsonl",
         "sft.data.train: latin1.jsonl: line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8",
         files={"latin1.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'
                .encode("latin-1")}),
    Case("sft-csv-column-missing", "run tiny.yaml --run-dir new sft.data.train=sft.csv",
         "sft.csv: row 1: field 'completion' is missing (format 'prompt_completion')",
         files={"sft.csv": "prompt,answer\nhello,world\n"}),
    Case("sft-csv-header-only", "run tiny.yaml --run-dir new sft.data.train=head.csv",
         "sft.data.train: head.csv: file has a header but no rows", files={"head.csv": "prompt,completion\n"}),
    Case("reward-parquet-column-missing", "run tiny.yaml --run-dir new reward.data.train=pairs.parquet",
         "pairs.parquet: row 1: no reward format fits the fields (prompt, good, bad); expected `chosen` + "
         "`rejected` (with an optional `prompt`) (rename with reward.data.columns)", make=lambda _: parquet_pairs("pairs.parquet")),
    Case("reward-folder-split-missing", "run tiny.yaml --run-dir new reward.data.train=prefs",
         "reward.data.train: prefs: no split 'train' (splits: train_prefs, test_prefs)",
         make=lambda _: preference_splits("prefs")),
    Case("reward-folder-without-splits", "run tiny.yaml --run-dir new reward.data.train=prefs/train_prefs "
         "reward.data.split=train_prefs",
         "reward.data.split: prefs/train_prefs is one dataset saved without splits (Dataset.save_to_disk), so it "
         "has no split 'train_prefs'; leave reward.data.split unset to use it whole, or save a DatasetDict",
         make=lambda _: preference_splits("prefs")),
    Case("eval-prompts-missing", "run demo.yaml --run-dir new eval.prompts=/nope/e.jsonl",
         "eval.prompts: data file not found: /nope/e.jsonl"),
    Case("model-path-missing", "run demo.yaml --run-dir new sft.input=/nope/model",
         "sft.input: path not found: /nope/model"),
    Case("model-without-tokenizer", "run tiny.yaml --run-dir new --stages reward reward.input=notok",
         "reward.input: notok holds no tokenizer (none of tokenizer.json, tokenizer_config.json, vocab.json, "
         "tokenizer.model); save the model's tokenizer into it (tokenizer.save_pretrained)",
         make=model_dir("notok", '{"model_type": "llama", "vocab_size": 8}', tokenizer=False)),
    Case("model-config-not-json", "run tiny.yaml --run-dir new --stages sft sft.input=badcfg",
         "sft.input: badcfg/config.json: not valid JSON (line 1 column 24: Expecting ',' delimiter)",
         make=model_dir("badcfg", '{"model_type": "llama" "vocab_size": 8}', tokenizer=True)),
    Case("longer-than-learned-positions", "run tiny.yaml --run-dir new --stages sft sft.input=gpt sft.max_length=1024",
         "sft.max_length: 1024 tokens, but the model in gpt (sft.input) has 512 learned positions (config.json); set "
         "at most 512",
         make=model_dir("gpt", '{"model_type": "gpt2", "vocab_size": 8, "n_positions": 512}', tokenizer=True)),
    Case("ppo-longer-than-learned-positions", "run tiny.yaml --run-dir new --stages ppo ppo.input=gpt "
         "ppo.reward_model=gpt ppo.max_prompt_length=500 ppo.max_new_tokens=24",
         "ppo.max_prompt_length + ppo.max_new_tokens: 524 tokens, but the model in gpt (ppo.input) has 512 learned "
         "positions (config.json); set at most 512",
         make=model_dir("gpt", '{"model_type": "gpt2", "vocab_size": 8, "n_positions": 512, "num_labels": 1}',
                        tokenizer=True)),
    Case("chat-rows-for-a-tokenizer-without-a-template", "run tiny.yaml --run-dir new --stages sft sft.input=plain "
         "sft.data.train=chats.jsonl",
         "sft.data.train: chats.jsonl: rows are chat turns, but the tokenizer of sft.input (plain) has no chat "
         "template; give it one (tokenizer.chat_template) or use plain strings",
         files={"chats.jsonl": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", '
                               '"content": "Hello."}]}\n'},
         make=model_dir("plain", '{"model_type": "llama", "vocab_size": 8}', tokenizer=True)),
    Case("tokenizer-path-missing", "run tiny.yaml --run-dir new pretrain.tokenizer=/nonexistent/tokenizer",
         "pretrain.tokenizer: path not found: /nonexistent/tokenizer"),
    Case("model-hub-id-offline", "run tiny.yaml --run-dir new sft.input=some-org/some-model",
         "sft.input: 'some-org/some-model' is not a local path and the Hugging Face hub is offline (HF_HUB_OFFLINE "
         "or HF_DATASETS_OFFLINE is set, or huggingface.co cannot be reached)"),
    Case("data-hub-id-offline", "run tiny.yaml --run-dir new sft.data.train=some-org/some-dataset",
         "sft.data.train: 'some-org/some-dataset' is not a local path and the Hugging Face hub is offline "
         "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, or huggingface.co cannot be reached)"),
    # --- a model input and its tokenizer that do not fit: from config.json and the tokenizer, no weights read
    Case("tokenizer-larger-than-its-model", "run tiny.yaml --run-dir new --stages sft sft.input=small",
         "sft.input: small: its tokenizer has 8 tokens but its config.json vocab_size is 5, so the model cannot "
         "embed them all; resize the embeddings and save it again", make=small_models),
    Case("pretrain-tokenizer-larger-than-the-model", "run tiny.yaml --run-dir new --stages pretrain "
         "pretrain.input=model5 pretrain.tokenizer=tok",
         "pretrain.tokenizer: the tokenizer in tok has 8 tokens but the model in model5 embeds only 5 (config.json "
         "vocab_size); resize the embeddings or use the model's own tokenizer", make=small_models),
    # --- settings the resolved DeepSpeed config rules out
    Case("ppo-deepspeed-override-misspelt", "run tiny.yaml --run-dir new ppo.enabled=true "
         "ppo.actor_deepspeed.zero_optimisation.stage=3",
         "tiny.yaml: ppo.actor_deepspeed.zero_optimisation: not a key of the DeepSpeed config it overrides; did you "
         "mean 'zero_optimization'?"),
    Case("ema-with-a-zero3-preset", "run tiny.yaml --run-dir new ppo.enabled=true ppo.ema_decay=0.9 "
         "deepspeed.config=zero3",
         "ppo.ema_decay: EMA is supported with ZeRO stages 0-2 (the actor is sharded under ZeRO-3)"),
    Case("ema-with-a-zero3-actor-override", "run tiny.yaml --run-dir new ppo.enabled=true ppo.ema_decay=0.9 "
         "'ppo.actor_deepspeed={zero_optimization: {stage: 3}}'",
         "ppo.ema_decay: EMA is supported with ZeRO stages 0-2 (the actor is sharded under ZeRO-3)"),
    # --- other commands given a path that is not what they need
    Case("status-not-a-run-dir", "status notrun", "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    Case("status-of-a-file", "status afile", "afile: is a file, not a run dir"),
    Case("status-missing", "status missing", "missing: run dir not found"),
    Case("report-not-a-run-dir", "report notrun", "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    Case("eval-not-a-run-dir", "eval notrun", "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    Case("resume-not-a-run-dir", "resume notrun", "notrun: not a run dir (no config.yaml; `rlhf run` makes one)"),
    Case("resume-from-final", "resume run --stage pretrain --from run/pretrain/final",
         "--from: run/pretrain/final is not a checkpoint of stage 'pretrain' of this run (expected "
         "run/pretrain/checkpoint-N)"),
    Case("resume-from-a-checkpoint-of-another-config", "resume run --stage pretrain --from run/pretrain/checkpoint-5",
         "run/pretrain/checkpoint-5: checkpoint was made with a different config (pretrain.lr: 0.001 -> 0.002); "
         "restore those settings or start the stage over (`rlhf resume RUN_DIR --stage pretrain --force` resumes "
         "anyway)", make=checkpoint_of(world_size=1, lr=0.001)),
    Case("resume-from-a-checkpoint-of-two-ranks", "resume run --stage pretrain --from run/pretrain/checkpoint-5 --force",
         "run/pretrain/checkpoint-5: saved with 2 ranks, now 1; resume with the same pretrain.deepspeed num_gpus x "
         "num_nodes (ZeRO shards are per rank)", make=checkpoint_of(world_size=2, lr=0.002)),
    Case("resume-unknown-stage", "resume run --stage nope",
         "--stage: unknown stage 'nope'; choices: pretrain, sft, reward, ppo"),
    Case("run-stages-empty", "run tiny.yaml --run-dir new --stages ,",
         "--stages: names no stage; choices: pretrain, sft, reward, ppo"),
    Case("resume-from-without-stage", "resume run --from run/pretrain/final",
         "--from needs --stage (which stage the checkpoint belongs to)"),
    Case("generate-out-a-directory", "generate run/pretrain/final --prompts p.jsonl --out notrun",
         "--out: notrun is a directory; give a file path such as notrun/responses.jsonl"),
    Case("chat-on-a-run-dir", "chat built", "built: not a model checkpoint (no config.json); did you mean "
         "built/sft/final?", make=model_dir("built/sft/final", '{"model_type": "llama", "vocab_size": 8}', tokenizer=True)),
    Case("chat-on-a-reward-model", "chat rm", "rm: a reward model (LlamaForSequenceClassification) scores text and "
         "does not write it; give a policy, e.g. RUN_DIR/ppo/final or RUN_DIR/sft/final",
         make=model_dir("rm", '{"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}',
                        tokenizer=True)),
    Case("eval-seed-out-of-range", "eval run --seed 18446744073709551616",
         "--seed: must be in [0, 4294967295] (got 18446744073709551616)"),
    Case("generate-seed-negative", "generate run/pretrain/final --prompts p.jsonl --seed -5",
         "--seed: must be in [0, 4294967295] (got -5)"),
    Case("resume-with-an-empty-config", "resume emptyrun",
         "emptyrun/config.yaml: empty; `rlhf run` writes it, so restore it or start the run again",
         files={"emptyrun/config.yaml": b"\n"}),
    Case("generate-out-dir-missing", "generate run/pretrain/final --prompts p.jsonl --out nodir/out.jsonl",
         "--out: directory nodir does not exist"),
]


@pytest.fixture
def place(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RLHF_DEBUG", "")
    Path("demo.yaml").write_text(DEMO.read_text())
    Path("tiny.yaml").write_text(TINY.read_text())
    Path("run/pretrain/final").mkdir(parents=True)
    Path("run/config.yaml").write_text(DEMO.read_text())
    Path("run/.lock").write_text("")
    Path("notrun").mkdir()
    Path("afile").write_text("x")
    Path("q.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    Path("p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    return tmp_path


def contents(place: Path) -> dict[str, str]:
    """Every path under `place`: 'dir', or a file's sha256; only the pid in a run dir's .lock may change, since
    the lock is taken (and the pid written) before the run dir's owner is checked."""
    return {str(p.relative_to(place)): "dir" if p.is_dir() else "lock" if p.name == ".lock"
            else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(place.rglob("*"))}


def prepare(case: Case, stack: ExitStack) -> None:
    for name, text in case.files.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        (Path(name).write_bytes if isinstance(text, bytes) else Path(name).write_text)(text)
    if case.make:
        case.make(stack)


def rlhf_here(command: str, capsys) -> tuple[int, str, str]:
    """`rlhf COMMAND` in this process: (exit code, stdout, stderr)."""
    from pipeline.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(shlex.split(command))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_gets_its_one_line(place, capsys, case):
    with ExitStack() as stack:
        prepare(case, stack)
        before = contents(place)
        code, out, err = rlhf_here(case.command, capsys)
    assert (code, err, out) == (2, f"error: {case.line}\n", "")  # nothing on stdout: no stage starts
    assert contents(place) == before


def test_the_catalogue_has_forty_cases_or_more():
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names) >= 40
