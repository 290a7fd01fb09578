"""Forward passes over prompt + response batches, shared by the PPO stage and the evaluation.

A `Rollout` is a left-padded prompt batch with the responses sampled for it. These helpers turn
it into model inputs and read what each model says about the responses: a policy's logits for
each response token, a value model's output per token (`TokenValueModel`), or a reward model's
score at the last real token, exactly where the reward trainer pooled.

Shapes: B = batch, P = prompt width (left-padded), T = response width, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.generation import position_ids_from_mask


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    responses: torch.Tensor  # [B, T] sampled tokens, pad after EOS
    mask: torch.Tensor  # [B, T] float, 1.0 through the first EOS
    ended: torch.Tensor  # [B] bool, response contains EOS


class TokenValueModel(torch.nn.Module):
    """A one-output sequence classifier read at every token: values [B, T]."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier  # the only submodule: see `backbone`

    # Read through the classifier rather than registered a second time as submodules: DeepSpeed's
    # ZeRO-3 walks the module tree and would hook (and run the hooks of) every backbone module twice.
    @property
    def backbone(self) -> torch.nn.Module:
        return getattr(self.classifier, self.classifier.base_model_prefix)

    @property
    def pad_token_id(self) -> int | None:
        return self.classifier.config.pad_token_id

    @property
    def head(self) -> torch.nn.Module:
        return self.classifier.score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability [B, T] of `labels` [B, T] (int64) under `logits` [B, T, V].

    `logits[:, t]` must already be the prediction for `labels[:, t]` (shift before calling).
    """
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)


def sequence_inputs(r: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + response as model inputs: ids, attention mask (padding off), positions. [B, P+T]"""
    ids = torch.cat([r.prompt_ids, r.responses], 1)
    attention = torch.cat([r.prompt_mask, r.mask.long()], 1)
    return ids, attention, position_ids_from_mask(attention)


def response_logits(model, r: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Logits predicting each response token, over the sampling temperature: [B, T, V]."""
    ids, attention, positions = sequence_inputs(r)
    # only the last T+1 positions' logits are needed: skip the LM head over the prompt
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                   logits_to_keep=r.responses.shape[1] + 1).logits
    logits = logits[:, :-1].float()
    # x / 1.0 is exact: skip it rather than copy [B, T, V] (and, in a training pass, its gradient too)
    return logits if temperature == 1.0 else logits / temperature


@torch.no_grad()
def response_logprobs(model, r: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the sampled response tokens under `model` at `temperature`, for scoring: [B, T].

    The log-softmax runs one row at a time, so beside the [B, T, V] logits only one row's exists,
    not a second [B, T, V] tensor (each is GiBs at a 150k vocabulary); each row's values are the same.
    """
    logits = response_logits(model, r, temperature)
    return torch.cat([logprobs_from_logits(row, tokens) for row, tokens in zip(logits.split(1), r.responses.split(1))])


def response_values(value_model, r: Rollout) -> torch.Tensor:
    """Critic values of the state before each response token: [B, T]."""
    ids, attention, positions = sequence_inputs(r)
    width = r.prompt_ids.shape[1]
    return value_model(ids, attention, positions)[:, width - 1 : -1]


def pooled_positions(ids: torch.Tensor, attention: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Where a sequence classifier reads each row [B]: the last real token whose id is not the pad id, as
    transformers' classifiers pool (and so where the reward trainer learned). When a tokenizer's pad token
    is its EOS (Llama-3, GPT-2 ship no pad), that is the token before the final EOS."""
    readable = attention.bool() if pad_id is None else attention.bool() & (ids != pad_id)
    columns = torch.arange(ids.shape[1], device=ids.device)
    return (columns * readable).argmax(-1)


def last_token_scores(value_model: TokenValueModel, r: Rollout) -> torch.Tensor:
    """Reward model output at the position the reward trainer pooled (pooled_positions): [B]."""
    ids, attention, positions = sequence_inputs(r)
    last = pooled_positions(ids, attention, value_model.pad_token_id)
    values = value_model(ids, attention, positions)
    return values.gather(1, last[:, None]).squeeze(1)
