"""Tokenizers and models: train a byte-level BPE, build a Llama-style model, load checkpoints safely.

Loading is safetensors-only and `trust_remote_code` stays off: a checkpoint can never run
code or unpickle objects on the machine that loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pipeline.config import ModelArch
from pipeline.errors import UserError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Each turn is marked by a role token; an assistant turn ends with EOS, so generation stops there.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (no unknown tokens) with pad/bos/eos, role tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: ModelArch, tokenizer, seed: int):
    """A freshly initialised Llama-style causal LM sized for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def model_source(path: str, what: str) -> str:
    """A local checkpoint dir, or a hub id that can be loaded now: the hub is reachable, or the model is in the
    local hub cache (HF_HOME), whose snapshot dir is then returned so nothing waits on the network."""
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    if path.startswith((".", "/", "~")) or p.suffix:
        raise UserError(f"{what}: path not found: {path}")
    from pipeline.data import hub_reachable

    if hub_reachable():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises several types)
        raise UserError(f"{what}: '{path}' is not a local path, not in the local hub cache, and the Hugging Face "
                        "hub is offline") from None


def load_tokenizer(path: str, what: str = "tokenizer", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = model_source(path, what)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: cannot load tokenizer from {path}: {str(err).splitlines()[0]}") from None
    return end_turns_with_eos(ensure_pad_token(tok))


def end_turns_with_eos(tokenizer):
    """Make the token that ends an assistant turn in the chat template the tokenizer's EOS, where they differ
    (Gemma ends turns with <end_of_turn> but its EOS is <eos>; a base Llama-3 or Qwen2.5 with a chat template
    ends turns with <|eot_id|> / <|im_end|>): generation stops at EOS, so it must be what SFT taught the model
    to write after an answer. Only a special token of the vocabulary is taken; nothing is added."""
    if not tokenizer.chat_template:
        return tokenizer
    marker = "\u2063answer\u2063"  # text no template adds around a turn
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # a template that cannot render a plain exchange: leave the tokenizer as it is
        return tokenizer
    after = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    added = tokenizer.added_tokens_decoder  # id -> AddedToken; the template's markers are special ones
    if ids and ids[0] != tokenizer.eos_token_id and ids[0] in added and added[ids[0]].special:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids[0])
    return tokenizer


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token (Llama-3, Mistral, GPT-2 ship none) one of its own tokens as pad:
    unk when it has one, else eos. No token is added, so the embeddings keep their size; padding is masked
    by the attention mask everywhere, so which id fills it never reaches the loss."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise UserError(f"tokenizer ({tokenizer.name_or_path}) has neither a pad, unk nor eos token; set a pad token "
                        "and save it")
    return tokenizer


def load_model(path: str, kind: str = "causal_lm", what: str = "model", trust_remote_code: bool = False,
               dtype=None, **kwargs):
    """Load a causal LM or a one-output sequence classifier from safetensors weights only.

    Weights load in fp32 (`dtype` None) whatever dtype the checkpoint stores (Qwen2.5 ships bf16): the
    training engines keep fp32 master weights and cast to the run's precision themselves, and a new head
    or LoRA adapter then has the same dtype as the body it sits on.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    src = model_source(path, what)
    try:
        model = cls.from_pretrained(src, use_safetensors=True, trust_remote_code=trust_remote_code,
                                    dtype=dtype or torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: cannot load model from {path}: {str(err).splitlines()[0]}") from None
    return fuse_tanh_gelu(model)


def fuse_tanh_gelu(model):
    """Swap GPT-2's tanh-approximated GELU (`gelu_new`: eight elementwise ops, each saving a tensor for
    backward) for PyTorch's one-kernel `gelu(approximate="tanh")`, the same function, which
    transformers ships as `GELUTanh`. Outputs differ only by float rounding (about 2e-7); on small
    models the eight ops cost a fifth of a training step. No weights change; the saved config is
    untouched, so a checkpoint loads the same anywhere."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    return model


def check_model_tokenizer(model, tokenizer, what: str) -> None:
    """Refuse a tokenizer whose ids the model cannot embed."""
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise UserError(f"{what}: tokenizer has {len(tokenizer)} tokens but the model ({model.name_or_path}) embeds "
                        f"only {n_embed}; resize the embeddings or use the model's own tokenizer")
