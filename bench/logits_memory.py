"""Peak memory and time of PPO's actor update and scoring at a real vocabulary, where logits dwarf the body.

At Qwen2.5's 151,936-token vocabulary one [rows, response tokens, vocab] float32 tensor of logits is
8 x 256 x 151,936 x 4 bytes = 1.16 GiB; how many such tensors a pass holds at once decides its peak
memory more than the model does. `--phase update` runs the stage's own `stages.ppo.update.actor_update`
(the engine a plain module with AdamW behind the same backward/step calls); `--phase score` runs
`stages.ppo.experience.policy_logprobs` (the actor's and the reference's log-probs of the sampled
tokens). A 2-layer Llama body with that vocabulary, a made-up rollout, a fresh process per repeat; it
prints the process's peak resident set above its level just before the pass (the pass's own memory:
logits, activations, gradients, AdamW state) and the pass's seconds:

    python bench/logits_memory.py [--phase update|score --rows 8 --prompt 64 --response 256 --vocab 151936]

Run it on two trees (a `git worktree` of the commit before a change, and after) to measure a change.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def one_pass(phase: str, rows: int, prompt: int, response: int, vocab: int, entropy_coef: float) -> dict[str, float]:
    """One actor_update (phase "update") or one scoring pass of the actor and a reference (phase "score",
    `policy_logprobs`) in this process: peak RSS above the level just before it (MiB) and seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from stages.ppo.experience import Rollout, policy_logprobs
    from stages.ppo.update import actor_update

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=prompt + response))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    class Engine(torch.nn.Module):  # the two calls actor_update makes on a DeepSpeed engine
        def __init__(self):
            super().__init__()
            self.module = model

        def forward(self, **kwargs):
            return self.module(**kwargs)

        def backward(self, loss):
            loss.backward()

        def step(self):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    r = Rollout(torch.randint(0, vocab, (rows, prompt)), torch.ones(rows, prompt, dtype=torch.long),
                torch.randint(0, vocab, (rows, response)), torch.ones(rows, response), torch.ones(rows, dtype=torch.bool))
    cfg = SimpleNamespace(temperature=1.0, clip_range=0.2, loss_agg="token_mean", entropy_coef=entropy_coef,
                          kl_in="reward")
    advantages = torch.randn(rows, response)
    reference = Engine()  # the same weights serve as the frozen reference: scoring cost is per model
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if phase == "update":
        actor_update(SimpleNamespace(actor=Engine()), r, None, advantages, cfg, None, 0.0)
    else:
        policy_logprobs(SimpleNamespace(actor=Engine(), reference=reference), r, 1.0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logits_mib = rows * response * vocab * 4 / 2**20
    return {"peak_mib": peak - before, "seconds": seconds, "logits_tensor_mib": logits_mib}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--entropy-coef", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", choices=("update", "score"), default="update")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one update, JSON out
    args = parser.parse_args(argv)
    shape = (args.phase, args.rows, args.prompt, args.response, args.vocab, args.entropy_coef)
    if args.one:
        print(json.dumps(one_pass(*shape)))
        return
    runs = []
    for _ in range(args.repeats):
        child = subprocess.run([sys.executable, __file__, *argv, "--one"], capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    peak = statistics.median(r["peak_mib"] for r in runs)
    seconds = statistics.median(r["seconds"] for r in runs)
    print(json.dumps({"tree": str(ROOT), "phase": args.phase, "rows": args.rows, "prompt": args.prompt, "response": args.response,
                      "vocab": args.vocab, "entropy_coef": args.entropy_coef,
                      "logits_tensor_mib": round(runs[0]["logits_tensor_mib"], 1),
                      "peak_mib": round(peak, 1), "peak_in_logits_tensors": round(peak / runs[0]["logits_tensor_mib"], 2),
                      "seconds": round(seconds, 3), "runs": runs}))


if __name__ == "__main__":
    main(sys.argv[1:])
