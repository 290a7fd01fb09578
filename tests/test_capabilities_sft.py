"""What the Hugging Face Trainer stages promise, checked by its effect inside a real stage run: SFT packing
fills sequences up to `sft.max_length`, the completion-only mask hides every prompt token, `sft.lora` hands
off base + adapter, and `pretrain.input` really starts training from that checkpoint.

Each stage runs in this process (tests/inprocess.py: the orchestrator as `rlhf run` runs it, the launcher
replaced by a call of the worker), one rank, one optimizer step, on a 2-layer width-32 Llama with a
400-token vocabulary. A spy on the trainer's `compute_loss` keeps the first training batch exactly as the
model received it, and the loss the trainer took from it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import ModelArch
from tests.conftest import TINY
from tests.inprocess import assert_merged_lora, launcher_in_process, spy

pytestmark = pytest.mark.slow  # trains stages

ARCH = ModelArch(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
MAX_LENGTH = 64
WORDS = "good bad film plot actor scene story music long short fine dull".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama with its tokenizer (chat template included): sft.input and pretrain.input.

    Its matrices are scaled up so that it predicts far from uniform, as a trained model does: at init every
    model's loss is about ln(400), and the continued-pretraining test must tell this one from the model
    pretraining would build from scratch."""
    from pipeline.models import build_model, train_tokenizer
    from pipeline.movie_reviews import load_reviews

    path = tmp_path_factory.mktemp("checkpoint")
    tokenizer = train_tokenizer([r.text for r in load_reviews()[:300]], vocab_size=400)
    model = build_model(ARCH, tokenizer, seed=7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def short_rows(tmp_path_factory) -> Path:
    """40 prompt/completion rows of 1-4 words each: every example is far shorter than MAX_LENGTH."""
    rng = random.Random(0)
    phrase = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))  # noqa: E731
    path = tmp_path_factory.mktemp("data") / "short.jsonl"
    path.write_text("".join(json.dumps({"prompt": phrase(), "completion": phrase()}) + "\n" for _ in range(40)))
    return path


@dataclass
class SFTRun:
    run_dir: Path
    trainer: Any  # the SFTTrainer of the run
    batch: dict[str, torch.Tensor]  # the first training batch, as the model received it
    loss: float  # the loss the trainer computed on it (before any update)


def run_sft(root: Path, checkpoint: Path, data: Path, *overrides: str) -> SFTRun:
    from trl import SFTTrainer

    from pipeline.orchestrator import run_pipeline

    calls: list = []
    run_dir = root / "run"
    with launcher_in_process() as mp:
        spy(mp, SFTTrainer, "compute_loss", calls)
        run_pipeline(str(TINY), [f"sft.input={checkpoint}", f"sft.data.train={data}", "sft.data.eval=null",
                                 f"sft.max_length={MAX_LENGTH}", "sft.max_steps=1", "sft.logging_steps=1",
                                 *overrides], "sft", str(run_dir))
    (trainer, model, inputs, *_), _, loss = next(c for c in calls if c[0][1].training)
    return SFTRun(run_dir, trainer, {k: v for k, v in inputs.items() if torch.is_tensor(v)}, loss.detach().item())


@pytest.fixture(scope="module")
def packed(tmp_path_factory, checkpoint, short_rows) -> SFTRun:
    return run_sft(tmp_path_factory.mktemp("packed"), checkpoint, short_rows, "sft.packing=true")


@pytest.fixture(scope="module")
def lora(tmp_path_factory, checkpoint, short_rows) -> SFTRun:
    return run_sft(tmp_path_factory.mktemp("lora"), checkpoint, short_rows, "sft.lora={r: 4, alpha: 8}")


def rendered_pairs(tokenizer, data: Path) -> set[tuple[str, str]]:
    """(prompt, completion) of every row as the chat template renders them: the prompt up to the assistant
    marker, the completion with its end-of-turn token."""
    pairs = set()
    for line in data.read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        pairs.add((prompt, row["completion"] + tokenizer.eos_token))
    return pairs


def assert_completion_only(ids: list[int], labels: list[int], tokenizer, pairs: set[tuple[str, str]]) -> None:
    """One example: every label before the completion is -100, every one after it is the token itself, and
    the split falls exactly where a data row's rendered prompt ends."""
    start = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:start])
    assert labels[start:] == ids[start:], "a completion token is not trained on"
    assert (tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:])) in pairs


def example_spans(position_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each example in a packed row: positions restart at 0 for every example."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


# ---------------------------------------------------------------------------------------------------------------
# packing


def test_packing_fills_sequences_up_to_max_length(packed, short_rows):
    rows = packed.trainer.train_dataset
    examples = [n for row in rows for n in row["seq_lengths"]]
    lengths = [len(row["input_ids"]) for row in rows]
    assert len(examples) == len(short_rows.read_text().splitlines())  # every example, none dropped
    assert all(sum(row["seq_lengths"]) == len(row["input_ids"]) for row in rows)  # nothing cut
    assert max(lengths) <= MAX_LENGTH and len(rows) < len(examples) / 3, lengths
    # Best fit decreasing: a sequence is left with room for the longest example only if no later one
    # was opened, so at most one sequence is that short.
    assert sum(n < MAX_LENGTH - max(examples) for n in lengths) <= 1, lengths
    manifest = json.loads((packed.run_dir / "sft" / "final" / "manifest.json").read_text())
    assert manifest["metrics"]["train_sequences"] == len(rows) and manifest["metrics"]["train_rows"] == len(examples)


def test_packed_batch_masks_each_prompt_and_keeps_examples_apart(packed, checkpoint, short_rows):
    """The first training batch: one row of several examples, each with its prompt masked (-100); the
    trainer's loss on it equals the completion tokens' mean loss with each example run on its own, so no
    example attended to another."""
    from transformers import AutoModelForCausalLM

    tokenizer = packed.trainer.processing_class
    batch = packed.batch
    ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free: one flat row
    spans = example_spans(positions)
    assert len(spans) >= 4  # a batch of 4 sequences, each holding several examples
    pairs = rendered_pairs(tokenizer, short_rows)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()  # the weights of step 1
    total, count = 0.0, 0
    for start, end in spans:
        assert_completion_only(ids[start:end], labels[start:end], tokenizer, pairs)
        x, y = torch.tensor([ids[start:end]]), torch.tensor(labels[start + 1:end])
        with torch.no_grad():
            logits = model(x).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    assert packed.loss == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the completion-only mask without packing, and LoRA


def test_unpacked_batch_trains_on_completions_only(lora, short_rows):
    tokenizer = lora.trainer.processing_class
    batch = lora.batch
    pairs = rendered_pairs(tokenizer, short_rows)
    assert batch["input_ids"].shape[0] == 4  # sft.batch_size rows, padded to the longest
    for ids, labels, mask in zip(*(batch[k].tolist() for k in ("input_ids", "labels", "attention_mask"))):
        real = sum(mask)
        assert mask == [1] * real + [0] * (len(mask) - real)  # padded on the right
        assert labels[real:] == [-100] * (len(mask) - real)  # padding is never a target
        assert_completion_only(ids[:real], labels[:real], tokenizer, pairs)


def test_lora_hands_off_base_plus_adapter(lora, checkpoint):
    """final/ is a plain model whose adapted weights are W + (alpha / r) B A, with A and B the trained
    adapters kept in final/adapter/, and every other weight the base's own."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = lora.run_dir / "sft" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["lora"]["merged"] is True and manifest["lora"]["r"] == 4 and manifest["lora"]["alpha"] == 8
    merged = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert not any("lora" in k for k in merged)
    base = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    adapted = assert_merged_lora(merged, base, adapter, lambda key: "base_model.model." + key.replace(
        ".weight", ".lora_A.weight"), scale=8 / 4)
    assert adapted == {"q_proj", "v_proj"}  # LoraSection's default targets, in every layer


# ---------------------------------------------------------------------------------------------------------------
# continued pretraining


def test_continued_pretraining_starts_from_the_given_checkpoint(tmp_path, checkpoint):
    """pretrain.input: the loss of the first step is the checkpoint's loss on that batch, not the loss of the
    model pretraining would otherwise build; the tokenizer is the checkpoint's (none is trained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from pipeline.models import build_model
    from pipeline.orchestrator import run_pipeline

    from pipeline.movie_reviews import load_reviews

    texts = tmp_path / "texts.jsonl"  # review text in a file: no movie-reviews splits to prepare, no eval
    texts.write_text("".join(json.dumps({"text": r.text}) + "\n" for r in load_reviews()[:20]))
    calls: list = []
    run_dir = tmp_path / "run"
    with launcher_in_process() as mp:
        spy(mp, Trainer, "compute_loss", calls)
        run_pipeline(str(TINY), [f"pretrain.input={checkpoint}", f"pretrain.data.train={texts}",
                                 "pretrain.data.eval=null", "pretrain.max_steps=1", "pretrain.logging_steps=1",
                                 "pretrain.save_steps=null"], "pretrain", str(run_dir))
    (_, model, inputs, *_), _, loss = next(c for c in calls if c[0][1].training)
    batch = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    loss = loss.detach().item()

    def loss_of(model) -> float:
        with torch.no_grad():
            return model.eval()(**batch).loss.item()

    assert loss == pytest.approx(loss_of(AutoModelForCausalLM.from_pretrained(checkpoint)), rel=1e-6)
    from_scratch = loss_of(build_model(ARCH, AutoTokenizer.from_pretrained(checkpoint), seed=0))
    assert abs(loss - from_scratch) > 0.1, (loss, from_scratch)  # the check can tell the two apart

    manifest = json.loads((run_dir / "pretrain" / "final" / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["path"] == str(checkpoint)
    assert not list((run_dir / "pretrain").glob("tokenizer-*"))  # the checkpoint's tokenizer, none trained
    logged = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert next(r["train/loss"] for r in logged if "train/loss" in r) == pytest.approx(loss, abs=1e-4)
