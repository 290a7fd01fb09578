"""Use a checkpoint: `rlhf generate` over a file of prompts and `rlhf chat` on stdin.

Both sample with the pipeline's own KV-cache sampler (pipeline.generation), so a response here is
drawn exactly as in PPO rollouts and evaluation. Prompts are formatted with the tokenizer's chat
template as a user turn, as every stage after pretraining saw them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline.checkpoint import atomic_write_text
from pipeline.data import BadJsonLine, json_lines
from pipeline.errors import UserError


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: must be >= 1 (got {self.max_new_tokens})")
        if self.temperature <= 0:
            raise UserError(f"--temperature: must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: must be in (0, 1] (got {self.top_p})")


def load_checkpoint(checkpoint: str):
    """(model on the best device, in eval mode; tokenizer; device) for a causal LM checkpoint."""
    import torch

    from pipeline.models import check_model_tokenizer, load_model, load_tokenizer

    local = Path(checkpoint).expanduser()
    if not local.exists() and checkpoint.startswith((".", "/", "~")):
        raise UserError(f"{checkpoint}: checkpoint not found")
    if local.is_dir():
        check_policy_dir(local)
    tokenizer = load_tokenizer(checkpoint, what="checkpoint")
    model = load_model(checkpoint, what="checkpoint")
    check_model_tokenizer(model, tokenizer, "checkpoint")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, device


def check_policy_dir(path: Path) -> None:
    """A local checkpoint must be a causal LM's (or its adapters'): not a run dir, a stage dir, a resumable
    checkpoint or a reward model, each of which once failed deep inside transformers or generated noise."""
    finals = [path / stage / "final" for stage in ("ppo", "sft", "pretrain")] + [path / "final"]
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        hint = next((f for f in finals if (f / "config.json").exists()), None)
        raise UserError(f"{path}: not a model checkpoint (no config.json)"
                        + (f"; did you mean {hint}?" if hint else "; give a stage's final dir, e.g. RUN_DIR/ppo/final"))
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # an adapter dir, or a config.json the loader reports on itself
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{path}: a reward model ({architectures[0]}) scores text and does not write it; give a "
                        "policy, e.g. RUN_DIR/ppo/final or RUN_DIR/sft/final")


def prompt_budget(model, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside the response in the model's context."""
    budget = model.config.max_position_embeddings - max_new_tokens
    if budget < 1:
        raise UserError(f"--max-new-tokens: {max_new_tokens} leaves no room for a prompt in the model's "
                        f"{model.config.max_position_embeddings}-token context")
    return budget


def read_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file (field `prompt`) or a .txt file (one per non-empty line)."""
    p = Path(path)
    if p.suffix not in (".jsonl", ".txt"):
        raise UserError(f"--prompts: {path}: expected a .jsonl (field 'prompt') or .txt (one per line) file")
    if not p.is_file():
        raise UserError(f"--prompts: file not found: {path}")
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".txt":
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = []
        try:
            for number, row in json_lines(lines):
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise UserError(f"--prompts: {path}:{number}: needs a string field 'prompt'")
                prompts.append(row["prompt"])
        except BadJsonLine as bad:
            raise UserError(f"--prompts: {path}:{bad.number}: not JSON ({bad.err.msg})") from None
    if not prompts:
        raise UserError(f"--prompts: {path}: no prompts")
    return prompts


def generate_file(checkpoint: str, prompts_path: str, out: str | None, sampling: Sampling, batch_size: int) -> int:
    """Write one JSONL row {prompt, response} per prompt to `out` (stdout when None); returns the count."""
    from pipeline.evaluation.sampling import generate

    sampling.validate()
    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1 (got {batch_size})")
    if out is not None and Path(out).is_dir():
        raise UserError(f"--out: {out} is a directory; give a file path such as {Path(out) / 'responses.jsonl'}")
    if out is not None and not Path(out).parent.is_dir():
        raise UserError(f"--out: directory {Path(out).parent} does not exist")
    prompts = read_prompts(prompts_path)
    model, tokenizer, device = load_checkpoint(checkpoint)
    texts, _ = generate(model, tokenizer, prompts, max_new_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                        max_prompt_length=prompt_budget(model, sampling.max_new_tokens), batch_size=batch_size,
                        device=device)
    lines = "".join(json.dumps({"prompt": p, "response": t}) + "\n" for p, t in zip(prompts, texts))
    if out is None:
        sys.stdout.write(lines)
    else:
        atomic_write_text(out, lines)
        print(f"wrote {len(prompts)} responses to {out}", file=sys.stderr)
    return len(prompts)


def conversation_ids(tokenizer, messages: list[dict[str, str]], budget: int) -> list[int]:
    """The conversation in the chat template, ending with the assistant's generation prompt.

    When it outgrows `budget`, the oldest exchanges go first (a system message stays); a single
    turn that is still too long keeps its last `budget` tokens.
    """
    messages = list(messages)
    while True:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= budget or len(messages) - first <= 1:
            return ids[-budget:]
        del messages[first : first + 2]  # one user turn and the assistant's reply to it


def reply(model, tokenizer, messages: list[dict[str, str]], sampling: Sampling, generator, device: str) -> str:
    """One sampled assistant turn for the conversation so far."""
    from pipeline.generation import left_pad, response_mask, sample, stop_token_ids

    ids, mask = left_pad([conversation_ids(tokenizer, messages, prompt_budget(model, sampling.max_new_tokens))],
                         tokenizer.pad_token_id, device)
    stops = stop_token_ids(tokenizer, model)
    tokens = sample(model, ids, mask, max_new_tokens=sampling.max_new_tokens, eos_id=stops,
                    pad_id=tokenizer.pad_token_id, temperature=sampling.temperature, top_p=sampling.top_p,
                    generator=generator)
    keep = response_mask(tokens, stops)[0] > 0
    return tokenizer.decode(tokens[0][keep].tolist(), skip_special_tokens=True).strip()


def chat(checkpoint: str, sampling: Sampling, system: str | None,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Read user lines until `/exit` or end of input; `/reset` forgets the conversation."""
    import torch

    sampling.validate()
    model, tokenizer, device = load_checkpoint(checkpoint)
    if not tokenizer.chat_template:
        raise UserError(f"{checkpoint}: tokenizer has no chat template; use `rlhf generate` for plain continuation")
    generator = torch.Generator(device=device).manual_seed(sampling.seed)  # one stream for the session: reproducible
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    interactive = stdin.isatty()
    if interactive:
        print("chat with the checkpoint; /reset clears the conversation, /exit or Ctrl-D quits", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(opening)
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, history, sampling, generator, device)
        history.append({"role": "assistant", "content": answer})
        print(f"assistant: {answer}", file=stdout, flush=True)
