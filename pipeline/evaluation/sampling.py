"""The model side of the evaluation: sample each policy's responses, measure their KL to the
reference, and score (prompt, response) texts with a reward model. Plain models, no engines."""

from __future__ import annotations

import torch

from pipeline.generation import encode_prompts, ended_with_eos, left_pad, response_mask, sample, stop_token_ids
from pipeline.scoring import Rollout, TokenValueModel, last_token_scores, response_logprobs


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
             seed: int, max_prompt_length: int = 256, batch_size: int = 32, device: str = "cpu",
             min_new_tokens: int = 0) -> tuple[list[str], list[Rollout]]:
    """Responses for `prompts` as text, and the token batches they were sampled as."""
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length)
    generator = torch.Generator(device=device).manual_seed(seed)  # sampling needs it on the model's device
    texts, batches = [], []
    stops = stop_token_ids(tokenizer, model)
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id, device)
        responses = sample(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=stops,
                           pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, generator=generator,
                           min_new_tokens=min_new_tokens)
        rmask = response_mask(responses, stops)
        texts += tokenizer.batch_decode(responses * rmask.long() + tokenizer.pad_token_id * (1 - rmask.long()),
                                        skip_special_tokens=True)
        batches.append(Rollout(ids, mask, responses, rmask, ended_with_eos(responses, stops)))
    return [t.strip() for t in texts], batches


@torch.no_grad()
def response_logprob_sums(model, batches: list[Rollout], temperature: float) -> torch.Tensor:
    """Sum of the response tokens' log-probs under `model` at the sampling temperature: [N]."""
    sums = []
    for r in batches:
        logprobs = response_logprobs(model, r, temperature)
        sums.append(torch.where(r.mask.bool(), logprobs, torch.zeros_like(logprobs)).sum(1))
    return torch.cat(sums)


class RewardModelScorer:
    """A reward-model checkpoint, loaded once, scoring (prompt, response) texts in batches.

    The one way the evaluation scores with a reward model: the run's own (a column beside the judge)
    and a gold judge alike. Texts are encoded with the reward model's own tokenizer (a gold judge may
    not share the policy's), the prompt as a chat user turn when it has a template, the response
    followed by EOS, and read at the last token, where the reward trainer pooled.
    """

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32, trust_remote_code: bool = False):
        from pipeline.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(path, what="reward model", trust_remote_code=trust_remote_code)
        self.model = TokenValueModel(load_model(path, kind="seq_cls", what="reward model",
                                                trust_remote_code=trust_remote_code)).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        tok = self.tokenizer
        prompt_ids = encode_prompts(tok, prompts, None)
        response_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = left_pad(prompt_ids[start : start + self.batch_size], tok.pad_token_id, self.device)
            chunk = response_ids[start : start + self.batch_size]
            width = max(len(x) for x in chunk)
            responses_t = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            rmask = torch.zeros((len(chunk), width))
            for i, x in enumerate(chunk):
                responses_t[i, : len(x)] = torch.tensor(x)
                rmask[i, : len(x)] = 1.0
            r = Rollout(ids, mask, responses_t.to(self.device), rmask.to(self.device), rmask[:, 0] > 0)
            scores += last_token_scores(self.model, r).tolist()
        return scores
