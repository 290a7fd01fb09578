"""Local stand-ins for what users bring from the hub: tiny random-weight checkpoints of the common causal-LM
families with real-style tokenizers and chat templates, and datasets in the exact schemas of the hub sets
our example configs name. Nothing is downloaded; every model is built with `from_config`.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Chat templates as the families ship them, trimmed of tool-calling branches.
CHATML = (  # Qwen2.5
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass
class Family:
    """How one model family's tokenizer looks: its special tokens and chat template (None: no template)."""

    specials: list[str]
    bos: str | None
    eos: str
    pad: str | None  # None: the family ships no pad token
    unk: str | None
    template: str | None


FAMILIES = {
    "qwen2": Family(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", None, CHATML),
    "llama": Family(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                    "<|begin_of_text|>", "<|eot_id|>", None, None, LLAMA3),
    "mistral": Family(["<unk>", "<s>", "</s>"], "<s>", "</s>", None, "<unk>", MISTRAL),
    "gpt2": Family(["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, None, None),
    # Gemma ends a chat turn with <end_of_turn>, but its tokenizer's eos is <eos> (as shipped)
    "gemma": Family(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
                    None, GEMMA),
}


# generation_config.json's eos_token_id lists of Qwen2.5-Instruct and Llama-3-Instruct
GENERATION_STOPS = {"qwen2": ["<|im_end|>", "<|endoftext|>"], "llama": ["<|eot_id|>", "<|end_of_text|>"]}


@functools.lru_cache(maxsize=None)
def _reviews() -> tuple[str, ...]:
    from pipeline.movie_reviews import load_reviews

    return tuple(r.text for r in load_reviews()[:400])


def review_texts(n: int = 300) -> list[str]:
    return list(_reviews()[:n])


def make_tokenizer(family: str, vocab_size: int = 400):
    """A byte-level BPE trained on a few reviews, with the family's special tokens and chat template (a fresh
    copy each call: callers may change it)."""
    return copy.deepcopy(_trained_tokenizer(family, vocab_size))


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(family: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(review_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=fam.specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
                                   unk_token=fam.unk)
    fast.chat_template = fam.template
    return fast


def model_config(family: str, tokenizer) -> Any:
    """A two-layer, 32-wide config of the family, sized for `tokenizer` (Qwen2 and Gemma tie embeddings)."""
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=512)
    if family == "qwen2":
        return Qwen2Config(**shape, **ids, tie_word_embeddings=True)
    if family == "llama":
        return LlamaConfig(**shape, **ids, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**shape, **ids, sliding_window=None)
    if family == "gemma":
        return GemmaConfig(**shape, **ids, head_dim=8, hidden_activation="gelu_pytorch_tanh")
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=512, **ids)
    raise ValueError(family)


def save_checkpoint(family: str, path: Path, dtype: str = "float32", seed: int = 0) -> Path:
    """A random-weight causal LM of the family and its tokenizer, saved with `save_pretrained` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, tokenizer))
    if family in GENERATION_STOPS:  # as the instruct checkpoints ship: generate() stops on any of these
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(GENERATION_STOPS[family])
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- datasets in the hub sets' schemas ---------------------------------------------------------------------------

def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def _openings(n: int, offset: int = 0) -> list[tuple[str, str, str]]:
    """(question, a good answer, a worse answer) made from real reviews: the opening, its continuation,
    and another review's continuation."""
    texts = review_texts(offset + n + 1)[offset:]
    out = []
    for i in range(n):
        words, other = texts[i].split(), texts[i + 1].split()
        out.append((f"What do you think of this film? {' '.join(words[:8])}", " ".join(words[8:20]),
                    " ".join(other[8:20])))
    return out


def ultrachat_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages (multi-turn)."""
    rows = []
    for i, (q, a, b) in enumerate(_openings(n, offset)):
        rows.append({"prompt": q, "prompt_id": f"id{offset + i}",
                     "messages": _turns(("user", q), ("assistant", a), ("user", "Say more."), ("assistant", b))})
    return rows


def ultrafeedback_binarized_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """trl-lib/ultrafeedback_binarized: chosen/rejected whole conversations sharing the user turn, and scores."""
    return [{"chosen": _turns(("user", q), ("assistant", a)), "rejected": _turns(("user", q), ("assistant", b)),
             "score_chosen": 8.0, "score_rejected": 3.0} for q, a, b in _openings(n, offset)]


def ultrafeedback_prompt_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """trl-lib/ultrafeedback-prompt: `prompt` is a list holding one user turn."""
    return [{"prompt": _turns(("user", q))} for q, _, _ in _openings(n, offset)]


def hh_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """Anthropic/hh-rlhf: chosen/rejected as "\\n\\nHuman: ...\\n\\nAssistant: ..." text."""
    return [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"}
            for q, a, b in _openings(n, offset)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_hub_folder(path: Path, splits: dict[str, list[dict[str, Any]]]) -> Path:
    """A folder laid out like a downloaded hub dataset: data/<split>-00000-of-00001.parquet per split."""
    import datasets

    for split, rows in splits.items():
        (path / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path
