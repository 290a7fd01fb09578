"""Checks before anything is written or launched: the run dir, data files, model paths, the judge.

`rlhf run` calls `check_before_writing` for every selected stage before it writes config.yaml; the
orchestrator calls `preflight` again for each stage as it comes (its inputs now exist) and
`preflight_launch` for a stage about to launch (hub access, weights format, reward head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import ds_config, movie_reviews
from pipeline.checkpoint import read_json
from pipeline.config import PipelineConfig, read_yaml
from pipeline.errors import UserError
from pipeline.rundir import RunDir, check_new_run_dir, stage_inputs


def check_run_dir_owner(run_dir: RunDir, cfg: PipelineConfig) -> None:
    """Refuse a run dir that holds another pipeline's run."""
    if not run_dir.config_path.exists():
        return
    previous = read_yaml(run_dir.config_path)
    name = (previous.get("run") or {}).get("name")
    if name is not None and name != cfg.run.name:
        raise UserError(
            f"{run_dir.root}: run dir holds pipeline run '{name}', not '{cfg.run.name}'; use another --run-dir"
        )


def uses_movie_reviews(cfg: PipelineConfig, stages: list[str]) -> bool:
    sources = [cfg.eval.prompts]
    for stage in stages:
        data = cfg.stage(stage).data
        sources += [data.train, data.eval]
    return any(s and s.startswith(movie_reviews.PREFIX) for s in sources)


def missing_local_data(source: str | None) -> bool:
    """A data source that names a local file or path (not the demo's splits, not a hub name) that is not there."""
    return bool(source) and not source.startswith(movie_reviews.PREFIX) and (
        Path(source).suffix in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/", "~"))
    ) and not Path(source).expanduser().exists()


def preflight(cfg: PipelineConfig, stage: str, run_dir: RunDir, inputs: dict[str, Any]) -> None:
    """Fail in a second, not after a launch: settings the resolved DeepSpeed config rules out, and local
    data and model paths must exist."""
    if stage == "ppo" and cfg.ppo.ema_decay is not None:
        check_ema_fits(cfg)
    section = cfg.stage(stage)
    for split in ("train", "eval"):
        source = getattr(section.data, split)
        if missing_local_data(source):
            raise UserError(f"{stage}.data.{split}: data file not found: {source}")
    for key, entry in inputs.items():
        path = entry and entry["path"]
        if path and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise UserError(f"{INPUT_KEYS[stage][key]}: path not found: {path}")
    if stage == "ppo" and cfg.eval.enabled:  # the stage ends by judging its policy
        from pipeline.evaluation.judges import check_judge

        if missing_local_data(cfg.eval.prompts):
            raise UserError(f"eval.prompts: data file not found: {cfg.eval.prompts}")
        check_judge(cfg.eval.judge, (inputs.get("reward_model") or {}).get("path"))


def check_ema_fits(cfg: PipelineConfig) -> None:
    """The EMA keeps whole copies of the actor's weights on each rank: not with a ZeRO-3 actor, however it
    became one (a preset, an inline dict or file, `ppo.actor_deepspeed`)."""
    ds = cfg.stage_deepspeed("ppo")
    actor = ds_config.ppo_configs(cfg.ppo, ds, ds.world_size, machine_checks=False).actor
    if ds_config.zero_stage(actor) == 3:
        raise UserError("ppo.ema_decay: EMA is supported with ZeRO stages 0-2 (the actor is sharded under ZeRO-3)")


# The config key that names each input of a stage (the keys of rundir.stage_inputs).
INPUT_KEYS = {
    "pretrain": {"model": "pretrain.input", "tokenizer": "pretrain.tokenizer"},
    "sft": {"model": "sft.input"},
    "reward": {"model": "reward.input"},
    "ppo": {"actor": "ppo.input", "reward_model": "ppo.reward_model", "critic": "ppo.critic"},
}
PICKLED_WEIGHTS = ("pytorch_model*.bin", "adapter_model*.bin", "*.ckpt", "consolidated*.pth")


def check_model_dir(path: Path, key: str) -> None:
    """A local model input must be a checkpoint dir with safetensors weights (pickle weights are never loaded)."""
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a checkpoint directory")
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise UserError(f"{key}: {path} holds no config.json; not a Hugging Face checkpoint")
    for name in ("config.json", "adapter_config.json"):
        if (path / name).exists():
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                where = f"line {err.lineno} column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) \
                    else "not UTF-8"
                raise UserError(f"{key}: {path / name}: not valid JSON ({where})") from None
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
        why = (f"only pickle weights ({', '.join(pickled)}), which are never loaded; convert them to safetensors"
               if pickled else "no *.safetensors weights")
        raise UserError(f"{key}: {path} holds {why}")


def check_reward_head(path: Path, key: str) -> None:
    """A reward model must score with exactly one output (a fresh head would score at random)."""
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        return  # adapters only: the stage checks the loaded model
    outputs = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if outputs != 1:
        raise UserError(f"{key}: {path} has {outputs} outputs (config.json); a reward model needs exactly one")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# The inputs whose own dir the stage loads its tokenizer from (pretrain's model only without pretrain.tokenizer;
# PPO scores rollouts with the actor's tokens, and only its evaluation reads the reward model's tokenizer).
TOKENIZER_FROM = {"pretrain": ("model",), "sft": ("model",), "reward": ("model",), "ppo": ("actor",)}


def check_has_tokenizer(path: Path, key: str) -> None:
    """A full model dir the stage loads its tokenizer from must hold one (an adapter dir may defer to its base)."""
    if (path / "config.json").exists() and not any((path / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"{key}: {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                        "model's tokenizer into it (tokenizer.save_pretrained)")


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def quick_tokenizer_size(tokenizer_dir: Path) -> int | None:
    """What len(AutoTokenizer.from_pretrained(dir)) gives a fast tokenizer, read with the `tokenizers` library:
    tokenizer.json's tokens and added tokens, plus one for each token tokenizer_config.json lists (its added
    tokens, the special tokens it names) that they lack, as transformers adds those. None without a tokenizer.json."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - the exact count decides
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    config = read_json(tokenizer_dir / "tokenizer_config.json")
    config = config if isinstance(config, dict) else {}
    added = config.get("added_tokens_decoder")
    named = list(added.values()) if isinstance(added, dict) else []
    named += [config.get(key) for key in SPECIAL_TOKEN_KEYS]
    for key in ("additional_special_tokens", "extra_special_tokens"):  # a list, or by name
        extra = config.get(key)
        named += list(extra.values()) if isinstance(extra, dict) else extra if isinstance(extra, list) else []
    contents = {t.get("content") if isinstance(t, dict) else t for t in named}
    return size + sum(1 for t in contents if isinstance(t, str) and t and backend.token_to_id(t) is None)


def check_tokenizer_fits(model_dir: Path, tokenizer_dir: Path, key: str) -> None:
    """A tokenizer with ids the model cannot embed would fail at the first batch, after the launch: say
    so now, from the model's config.json and the tokenizer alone (no weights are read)."""
    config = read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        return  # adapters only: the stage checks the loaded model
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not vocab or not any((tokenizer_dir / name).exists() for name in TOKENIZER_FILES):
        return
    quick = quick_tokenizer_size(tokenizer_dir)
    if quick is not None and quick <= vocab:
        return  # it fits; only a refusal needs the exact count below (transformers' import alone takes 3-5 s)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on config.json are the stage's to print, not this check's
    try:
        size = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    except Exception:  # noqa: BLE001 - one that does not load is reported by the stage, with its own message
        return
    finally:
        hf_logging.set_verbosity(verbosity)
    if size <= vocab:
        return
    if tokenizer_dir.resolve() == model_dir.resolve():
        raise UserError(f"{key}: {model_dir}: its tokenizer has {size} tokens but its config.json vocab_size is "
                        f"{vocab}, so the model cannot embed them all; resize the embeddings and save it again")
    raise UserError(f"{key}: the tokenizer in {tokenizer_dir} has {size} tokens but the model in {model_dir} embeds "
                    f"only {vocab} (config.json vocab_size); resize the embeddings or use the model's own tokenizer")


ROTARY_OR_ALIBI_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base")


def learned_positions(config: dict[str, Any]) -> int | None:
    """How many positions a model with learned position embeddings has (GPT-2, OPT, GPT-Neo): a longer sequence
    indexes past them and fails mid-step. None for rotary or ALiBi models, which run longer ones (however well)."""
    if any(key in config for key in ROTARY_OR_ALIBI_KEYS) or config.get("alibi"):
        return None
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    return positions if isinstance(positions, int) else None


def longest_sequence(cfg: PipelineConfig, stage: str) -> tuple[int, str]:
    """The longest sequence (prompt and response) a stage feeds its models, and the keys that set it."""
    section = cfg.stage(stage)
    if stage == "pretrain":
        return section.seq_len, "pretrain.seq_len"
    if stage == "ppo":
        return section.max_prompt_length + section.max_new_tokens, "ppo.max_prompt_length + ppo.max_new_tokens"
    return section.max_length, f"{stage}.max_length"


def check_positions_fit(model_dir: Path, cfg: PipelineConfig, stage: str, key: str) -> None:
    config = read_json(model_dir / "config.json")
    positions = learned_positions(config) if isinstance(config, dict) else None
    length, setting = longest_sequence(cfg, stage)
    if positions is not None and length > positions:
        raise UserError(f"{setting}: {length} tokens, but the model in {model_dir} ({key}) has {positions} learned "
                        f"positions (config.json); set at most {positions}")


def preflight_launch(cfg: PipelineConfig, stage: str, inputs: dict[str, Any]) -> None:
    """Checks for a stage about to launch (not one being skipped): hub access, weights format, reward head."""
    from pipeline.data import hub_reachable, is_local_source

    remote: list[tuple[str, str]] = []  # (config key, hub id)
    for key, entry in inputs.items():
        path = entry and entry["path"]
        if not path:
            continue
        local = Path(path).expanduser()
        if not local.exists():
            remote.append((INPUT_KEYS[stage][key], path))
        elif key != "tokenizer":
            check_model_dir(local, INPUT_KEYS[stage][key])
            if key == "reward_model":
                check_reward_head(local, INPUT_KEYS[stage][key])
            given = (inputs.get("tokenizer") or {}).get("path") if key == "model" else None  # pretrain.tokenizer
            evaluated = stage == "ppo" and key == "reward_model" and cfg.eval.enabled
            if not given and (key in TOKENIZER_FROM[stage] or evaluated):
                check_has_tokenizer(local, INPUT_KEYS[stage][key])
            tokenizer = Path(given).expanduser() if given else local
            check_tokenizer_fits(local, tokenizer, INPUT_KEYS[stage]["tokenizer" if given else key])
            check_positions_fit(local, cfg, stage, INPUT_KEYS[stage][key])
    for split in ("train", "eval"):
        source = getattr(cfg.stage(stage).data, split)
        if source and not source.startswith(movie_reviews.PREFIX) and not is_local_source(source):
            remote.append((f"{stage}.data.{split}", source))
    if remote and not hub_reachable():
        key, name = remote[0]
        raise UserError(f"{key}: '{name}' is not a local path and the Hugging Face hub is offline "
                        "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, or huggingface.co cannot be reached)")


def has_chat_template(tokenizer_dir: Path) -> bool:
    """What transformers reads a chat template from: chat_template.jinja/.json, or tokenizer_config.json's key."""
    if (tokenizer_dir / "chat_template.jinja").exists() or (tokenizer_dir / "chat_template.json").exists():
        return True
    config = read_json(tokenizer_dir / "tokenizer_config.json")
    return isinstance(config, dict) and bool(config.get("chat_template"))


def check_chat_template(cfg: PipelineConfig, stage: str, inputs: dict[str, Any], first_rows: dict[str, Any]) -> None:
    """Rows of chat turns are rendered by the tokenizer's chat template: one that has none is refused now, not
    after the launch (and after the earlier stages trained). Only a model dir that exists now is read."""
    chat = [split for split, row in first_rows.items() if any(isinstance(v, list) for v in row.values())]
    for key in TOKENIZER_FROM[stage] if chat else ():
        path = (inputs.get(key) or {}).get("path")
        local = Path(path).expanduser() if path else None
        if local is not None and (local / "config.json").exists() and any(
                (local / name).exists() for name in TOKENIZER_FILES) and not has_chat_template(local):
            source = getattr(cfg.stage(stage).data, chat[0])
            raise UserError(f"{stage}.data.{chat[0]}: {source}: rows are chat turns, but the tokenizer of "
                            f"{INPUT_KEYS[stage][key]} ({local}) has no chat template; give it one "
                            "(tokenizer.chat_template) or use plain strings")


def check_before_writing(cfg: PipelineConfig, run_dir: RunDir, stages: list[str]) -> None:
    """Everything that can be checked without training, for every selected stage, before `rlhf run`
    writes config.yaml or launches: the run dir, data files and their first rows, the judge, and the
    model inputs that exist now (weights format, reward head, tokenizer fit, hub access)."""
    from pipeline.data import check_first_row

    check_new_run_dir(run_dir.root)
    for i, stage in enumerate(stages):
        inputs = stage_inputs(cfg, stage, run_dir, upcoming=stages[:i])  # without what an earlier stage makes
        preflight(cfg, stage, run_dir, inputs)
        preflight_launch(cfg, stage, inputs)
        first_rows = check_first_row(cfg.stage(stage).data, stage, stage)
        check_chat_template(cfg, stage, inputs, first_rows)
