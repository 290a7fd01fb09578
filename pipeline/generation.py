"""Batched sampling with the KV cache, shared by PPO rollouts, evaluation and `rlhf generate`/`chat`.

The loop is ours rather than `model.generate` because at RLHF sizes the per-token framework
overhead dominates: each step here is one cached forward of the newest token plus the sampler,
with no logits processors, stopping-criteria objects or host syncs beyond one `all()` per token.
Under ZeRO-3, callers sample inside `pipeline.zero3.gathered_module`: the actor's weights are
gathered once per rollout batch and DeepSpeed's per-module hooks are off, so no token pays for an all-gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.chat import render_prompt
from pipeline.schemas import Prompt


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, P], mask [B, P]) padded on the left, so every prompt ends at column P-1."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, prompts: list[Prompt], max_len: int | None) -> list[list[int]]:
    """Prompt ids: a string as one user turn, a list of turns as they are, through the chat template (when the
    tokenizer has one). Keeps the last `max_len` tokens (all with None), so the generation prompt that ends
    the template survives."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids if max_len is None else [x[-max_len:] for x in ids]


def stop_token_ids(tokenizer, model=None) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's EOS and every id the model's generation_config lists.

    Instruct checkpoints often list several (Qwen2.5: `<|im_end|>` and `<|endoftext|>`; Llama-3:
    `<|eot_id|>`, `<|eom_id|>` and `<|end_of_text|>`), and `generate` stops on any of them; so do we.
    """
    ids = {tokenizer.eos_token_id}
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        listed = getattr(getattr(candidate, "generation_config", None), "eos_token_id", None)
        if listed is not None:
            ids.update([listed] if isinstance(listed, int) else listed)
            break
    return tuple(sorted(i for i in ids if i is not None))


def _stop_tensor(eos_id: int | Sequence[int], device) -> torch.Tensor:
    return torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits [B, V]; temperature then nucleus (top-p) filtering.

    Drawn by inverting the CDF with one uniform number per row: `torch.multinomial` draws an
    exponential per vocabulary entry (six times slower at a 400-token vocabulary, and it grows with it).
    u lies in (0, total], so the first index whose cumulative probability reaches u always exists
    and never has probability 0 (a masked or filtered token's cumulative value equals its predecessor's).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the first token always stays
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    cdf = logits.softmax(-1).cumsum(-1)
    uniform = 1.0 - torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:]).squeeze(-1)


def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Sample responses [B, max_new_tokens] for left-padded prompts; after EOS a row holds `pad_id`.

    `eos_id` is one id or several (`stop_token_ids`); a row ends at the first of any of them.
    EOS cannot be sampled before `min_new_tokens` tokens (as in `generate(min_new_tokens=...)`).
    Stops early once every row has produced EOS (the returned width is then smaller).
    The loop runs in inference mode (no autograd bookkeeping per op); the tokens are copied out of it
    so that the update's forward may keep them for its backward.
    """
    with torch.inference_mode():
        tokens = _sample(model, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_p,
                         generator, min_new_tokens)
    return tokens.clone()


def _sample(model, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_p, generator,
            min_new_tokens) -> torch.Tensor:
    from transformers import DynamicCache

    batch, width = prompt_ids.shape
    device = prompt_ids.device
    attention = torch.cat([prompt_mask, torch.ones((batch, max_new_tokens), dtype=prompt_mask.dtype, device=device)], 1)
    positions = position_ids_from_mask(prompt_mask)
    cache = DynamicCache()
    logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    next_position = positions[:, -1:] + 1
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stops = _stop_tensor(eos_id, device)
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits = logits.clone()
            logits[:, stops] = float("-inf")
        token = sample_token(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens[:, t] = token
        done |= torch.isin(token, stops)
        if t == max_new_tokens - 1 or bool(done.all()):
            return tokens[:, : t + 1]
        logits = model(input_ids=token[:, None], attention_mask=attention[:, : width + t + 1],
                       position_ids=next_position + t, past_key_values=cache, use_cache=True).logits[:, -1]
    return tokens


def response_mask(responses: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """1.0 up to and including the first EOS (any stop id) of each row, 0.0 after it. [B, T] float."""
    is_eos = torch.isin(responses, _stop_tensor(eos_id, responses.device)).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).float()


def ended_with_eos(responses: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """[B] bool: the row produced a stop id (it finished rather than ran out of tokens)."""
    return torch.isin(responses, _stop_tensor(eos_id, responses.device)).any(-1)
