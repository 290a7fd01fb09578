"""The PPO stage's parts on a tiny Llama in this process (one gloo rank, no launcher): the LoRA reference, the
value process against the one-process loop, a critic from a several-output classifier, ZeRO-3 scoring,
gathering and updating against the unsharded models, and the fused gradient clip against DeepSpeed's.

Also the tiny setup every PPO test file shares (fixture `tiny`, `write_config`, the `rlhf run` helpers).
Every model is built here from scratch (tokenizer, policy, reward model); nothing comes from the hub. The
stage through the real CLI is in tests/test_ppo_cli.py, the sampler in tests/test_sampler.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from pipeline.config import ModelArch
from pipeline.generation import left_pad, response_mask
from tests.conftest import destroy_process_group

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


ARCH = ModelArch(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
RUN_TIMEOUT_S = 900  # generous: a loaded 2-core machine can be 5x slower than an idle one


@dataclass
class Tiny:
    tokenizer: Any
    policy: Any  # LlamaForCausalLM, in memory for the sampler tests
    policy_dir: Path  # the same weights saved with the tokenizer: ppo.input
    reward_dir: Path  # a one-output sequence classifier: ppo.reward_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import build_model, train_tokenizer
    from pipeline.movie_reviews import load_reviews

    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = train_tokenizer([r.text for r in load_reviews()[:300]], vocab_size=400)
    policy = build_model(ARCH, tokenizer, seed=0).eval()
    policy_dir, reward_dir = root / "policy", root / "reward"
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return Tiny(tokenizer, policy, policy_dir, reward_dir)


# ---------------------------------------------------------------------------------------------------------------
# the setup the PPO test files share: a config for the tiny models, `rlhf run` and what it leaves


def write_config(path: Path, tiny: Tiny, *, name: str = "ppotest", deepspeed: dict | None = None,
                 eval_enabled: bool = True, **ppo: Any) -> Path:
    config = {
        "run": {"name": name, "seed": 0},
        "deepspeed": deepspeed or {"config": "zero0", "num_gpus": 1},
        "tracking": "none",
        "movie_reviews": {"eval_text_docs": 20, "sft_examples": 64, "sft_eval_examples": 16, "reward_pairs": 64,
                          "reward_eval_pairs": 16, "ppo_prompts": 64, "eval_prompts": 16},
        "pretrain": {"enabled": False},
        "sft": {"enabled": False},
        "reward": {"enabled": False},
        "ppo": {
            "input": str(tiny.policy_dir),
            "reward_model": str(tiny.reward_dir),
            "data": {"train": "movie-reviews:ppo_train", "eval": "movie-reviews:ppo_eval"},
            "rollout_batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8,
            "max_steps": 4, "save_steps": 2, "lr": 1.0e-3, "logging_steps": 1,
            **ppo,
        },
        "eval": {"enabled": eval_enabled, "num_prompts": 8},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def rlhf_command(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    script = Path(sys.executable).with_name("rlhf")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    return [*base, "run", str(config), "--run-dir", str(run_dir), *overrides]


def cli_env() -> dict[str, str]:
    # One thread per rank: these matrices are too small to split, and spare threads only contend for the cores.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def rlhf_run(config: Path, run_dir: Path, *overrides: str) -> str:
    proc = subprocess.run(rlhf_command(config, run_dir, *overrides), env=cli_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"rlhf run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def metric_rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl by step; a resumed run appends the steps it redoes, so the last row of a step wins."""
    rows = {}
    for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def without_time(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "ppo" / "final" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


# ---------------------------------------------------------------------------------------------------------------
# the stage's parts in this process


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def single_process_group(monkeypatch):
    """A one-rank gloo group in this process, for building the engines without the launcher."""
    from pipeline.launch import free_port
    from pipeline.worker import init_distributed

    for key, value in {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    destroy_process_group()  # a group another test left, and DeepSpeed's handles on it
    init_distributed()
    yield
    destroy_process_group()


def ppo_context(tiny: Tiny, tmp_path: Path, **config: Any):
    """The PPO stage's context for a tiny config (no tracker, no evaluation), as the worker makes it."""
    from pipeline.config import load_config
    from pipeline.context import StageContext
    from pipeline.rundir import RunDir, stage_inputs

    cfg = load_config(write_config(tmp_path / "ppo.yaml", tiny, eval_enabled=False, **config))
    run_dir = RunDir(tmp_path / "run")
    return StageContext(name="ppo", config=cfg, run_dir=run_dir, inputs=stage_inputs(cfg, "ppo", run_dir),
                        config_hash="test", deepspeed=cfg.stage_deepspeed("ppo"), tracker=None)


def in_process_models(tiny: Tiny, tmp_path: Path, **config: Any):
    """The four PPO engines built as the stage builds them, in this process (needs single_process_group)."""
    from stages.ppo.engines import build_models

    return build_models(ppo_context(tiny, tmp_path, **config), tiny.tokenizer, total_updates=4)


def two_prompt_rollout(tok):
    """Two left-padded prompts with hand-picked responses: one cut off, one ending in EOS then padding."""
    from stages.ppo import experience as xp

    ids, mask = left_pad([tok("A fine film", add_special_tokens=False)["input_ids"],
                          tok("It was", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    responses = torch.tensor([[11, 12, 13], [14, tok.eos_token_id, tok.pad_token_id]])
    return xp.Rollout(ids, mask, responses, response_mask(responses, tok.eos_token_id), torch.tensor([False, True]))


def test_lora_reference_is_the_base_with_adapters_off(tiny, tmp_path, single_process_group):
    from stages.ppo import experience as xp
    from stages.ppo.maths import logprobs_from_logits
    from stages.ppo.value_process import InProcess

    models = in_process_models(tiny, tmp_path, lora=LORA)
    assert models.reference is None and models.uses_lora  # no separate reference engine

    with torch.no_grad():  # move the actor away from its base, as training would
        for name, p in models.actor.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    r = two_prompt_rollout(tiny.tokenizer)
    scores = xp.score(models, InProcess(models), r, temperature=1.0)
    with torch.no_grad():
        base = logprobs_from_logits(xp.response_logits(tiny.policy, r), r.responses)
    torch.testing.assert_close(scores.ref_logprobs, base)
    assert not torch.allclose(scores.logprobs * r.mask, base * r.mask), "the actor's adapters had no effect"


def test_value_process_gives_the_same_scores_updates_and_weights(tiny, tmp_path, single_process_group):
    """On one CPU rank the critic and reward model live in a second process beside the actor and the
    reference: the same operations on the same inputs, so scores, logged stats and weights are bit for
    bit those of the one-process loop (these ops are too small to be split across intra-op threads)."""
    from dataclasses import astuple

    from pipeline.generation import encode_prompts
    from stages.ppo import experience as xp
    from stages.ppo.engines import build_models
    from stages.ppo.trainer import start_models
    from stages.ppo.update import update
    from stages.ppo.value_process import InProcess, ValueProcess, critic_state

    ctx = ppo_context(tiny, tmp_path)
    cfg = ctx.config
    tok = tiny.tokenizer
    ids, mask = left_pad(encode_prompts(tok, ["A fine film", "It was", "The plot", "Why"], 32), tok.pad_token_id)
    results = []
    for separate in (False, True):
        if separate:
            models, values = start_models(ctx, tok, total_updates=8)
            assert isinstance(values, ValueProcess)  # one CPU rank under ZeRO-0
        else:
            models = build_models(ctx, tok, total_updates=8)
            values = InProcess(models)  # all four here
        try:
            r = xp.rollout(models.actor, ids, mask, cfg.ppo, tok, torch.Generator().manual_seed(0))
            scored = xp.score(models, values, r, cfg.ppo.temperature)
            adv = xp.advantages(scored, scored.raw_scores, r, cfg.ppo, 0.05)
            stats = update(models, values, xp.Experience(rollout=r, scores=scored, advantages=adv), cfg.ppo, 2,
                           torch.Generator().manual_seed(1))
            critic = values.call(critic_state)
        finally:
            values.close()
        weights = {**{f"actor.{k}": v.detach().clone() for k, v in models.actor.module.state_dict().items()},
                   **{f"critic.{k}": v for k, v in critic.items()}}
        results.append((scored, stats, weights))
    (one_scored, one_stats, one_weights), (two_scored, two_stats, two_weights) = results
    assert all(torch.equal(a, b) for a, b in zip(astuple(one_scored), astuple(two_scored)))
    assert two_stats == one_stats
    assert one_weights.keys() == two_weights.keys()
    assert all(torch.equal(one_weights[k], two_weights[k]) for k in one_weights)


def test_value_process_build_error_is_raised_in_the_ppo_loop(tiny, tmp_path, single_process_group):
    """The reward model is loaded in the value process; its refusal reaches the PPO loop as the same
    one-line UserError, and the process is gone afterwards."""
    import multiprocessing

    from transformers import AutoModelForSequenceClassification

    from pipeline.errors import UserError
    from stages.ppo.trainer import start_models

    two = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_pretrained(tiny.policy_dir, num_labels=2).save_pretrained(two)
    tiny.tokenizer.save_pretrained(two)
    ctx = ppo_context(tiny, tmp_path, reward_model=str(two))
    with pytest.raises(UserError, match=f"ppo.reward_model: {two} has 2 outputs; a reward model must have exactly one"):
        start_models(ctx, tiny.tokenizer, total_updates=1)
    assert not multiprocessing.active_children()


def test_critic_from_a_classifier_with_several_outputs_gets_a_fresh_value_head(tiny, tmp_path, single_process_group):
    """`ppo.critic` may start from any classifier: its head is replaced by one output (the reward model's is not)."""
    from transformers import AutoModelForSequenceClassification

    from stages.ppo.engines import build_models

    three = tmp_path / "three_labels"
    AutoModelForSequenceClassification.from_pretrained(tiny.policy_dir, num_labels=3).save_pretrained(three)
    tiny.tokenizer.save_pretrained(three)
    models = build_models(ppo_context(tiny, tmp_path, critic=str(three)), tiny.tokenizer, total_updates=1)
    assert models.critic.module.head.out_features == 1
    assert models.reward.module.head.out_features == 1


def test_zero3_scoring_matches_the_unsharded_models_and_leaves_them_sharded(tiny, tmp_path, single_process_group):
    """Under ZeRO-3 each model is gathered whole for its scoring forward (one collective, hooks off):
    the numbers are those of the unsharded models, and every weight is partitioned again after."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import AutoModelForSequenceClassification

    from stages.ppo import experience as xp
    from stages.ppo.engines import TokenValueModel
    from stages.ppo.maths import logprobs_from_logits
    from stages.ppo.value_process import InProcess

    models = in_process_models(tiny, tmp_path, deepspeed={"config": "zero3", "num_gpus": 1})
    engines = (models.actor, models.critic, models.reference, models.reward)
    assert all(e.zero_optimization_stage() == 3 for e in engines)
    r = two_prompt_rollout(tiny.tokenizer)

    s = xp.score(models, InProcess(models), r, temperature=1.0)
    logprobs, ref_logprobs, values, scores = s.logprobs, s.ref_logprobs, s.values, s.raw_scores

    reward = TokenValueModel(AutoModelForSequenceClassification.from_pretrained(tiny.reward_dir)).eval()
    with torch.no_grad():
        expected_logprobs = logprobs_from_logits(xp.response_logits(tiny.policy, r), r.responses)
        expected_values, expected_scores = xp.response_values(reward, r), xp.last_token_scores(reward, r)
    torch.testing.assert_close(logprobs, expected_logprobs)
    torch.testing.assert_close(ref_logprobs, expected_logprobs)
    torch.testing.assert_close(values, expected_values)  # the critic starts as the reward model
    torch.testing.assert_close(scores, expected_scores)
    for engine in engines:
        assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in engine.module.parameters())


def test_fused_gradient_clip_is_deepspeeds_clip_bit_for_bit(tiny, tmp_path, single_process_group):
    """ZeRO-0 fp32 engines clip with foreach kernels (engines.fused_fp32_clip); the clipped gradients
    must be exactly what DeepSpeed's own clip_grad_norm_ gives, below and above the threshold."""
    from deepspeed.runtime.utils import clip_grad_norm_

    models = in_process_models(tiny, tmp_path)
    engine = models.actor
    max_norm = engine.gradient_clipping()
    assert max_norm > 0
    params = [p for p in engine.module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for scale in (1e-4, 1.0, 30.0):
        grads = [torch.randn(p.shape, generator=gen) * scale for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        engine.clip_fp32_gradients()
        fused = [p.grad.clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        clip_grad_norm_(parameters=params, max_norm=max_norm, mpu=None)
        assert all(torch.equal(a, p.grad) for a, p in zip(fused, params)), f"scale {scale}"
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
        clipped = any(not torch.equal(a, g) for a, g in zip(fused, grads))
        assert clipped == (norm > max_norm), f"scale {scale}: norm {norm}, clipped {clipped}"
        seen.add(clipped)
    assert seen == {True, False}  # both sides of the threshold were exercised


def test_zero3_gather_for_scoring_keeps_the_hooks_and_the_recorded_fetch_order(tiny, tmp_path, single_process_group):
    """ZeRO-3 records the order in which a training forward/backward fetches parameters and prefetches
    along it from then on. Gathering a model for rollout or scoring takes its hooks off and puts the
    very same ones back, so that order stays valid: no update after scoring runs without prefetch."""
    from stages.ppo import experience as xp
    from stages.ppo.value_process import InProcess

    models = in_process_models(tiny, tmp_path, deepspeed={"config": "zero3", "num_gpus": 1})
    r = two_prompt_rollout(tiny.tokenizer)
    losses = {models.actor: lambda: xp.response_logits(models.actor, r).float().logsumexp(-1).mean(),
              models.critic: lambda: xp.response_values(models.critic, r).pow(2).mean()}

    def coordinator(engine):
        return engine.optimizer.parameter_offload.get_param_coordinator()

    def hooks(engine):
        return [(name, getattr(m, "ds_id", None), list(m._forward_pre_hooks.items()), list(m._forward_hooks.items()))
                for name, m in engine.module.named_modules()]

    def train_step(engine) -> None:
        engine.backward(losses[engine]())
        engine.step()

    for engine in losses:
        for _ in range(2):  # the first step invalidates the empty trace, the second records it
            train_step(engine)
        assert coordinator(engine).is_complete_trace()
    before = {engine: hooks(engine) for engine in losses}

    xp.score(models, InProcess(models), r, temperature=1.0)
    for engine in losses:
        assert hooks(engine) == before[engine]  # same modules, ids, hook functions and order
        assert coordinator(engine).is_complete_trace()
        train_step(engine)  # follows the recorded order: nothing invalidates it
        assert coordinator(engine).is_complete_trace()


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_zero3_update_gathers_a_model_within_the_live_budget_once_and_trains_as_per_module_fetch(
        tiny, tmp_path, single_process_group, monkeypatch, lora):
    """A ZeRO-3 update pass whose model fits `stage3_max_live_parameters` gathers it whole (one
    collective, DeepSpeed's per-module fetch hooks off); a model over the budget keeps per-module
    fetch. Both must train to the same weights, and leave the models partitioned and hooked as before."""
    import deepspeed
    import torch.nn.functional as F
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from pipeline.zero3 import fits_live_budget
    from stages.ppo import update

    fetched = []
    fetch = PartitionedParameterCoordinator.fetch_sub_module
    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module",
                        lambda self, module, *a, **k: (fetched.append(module), fetch(self, module, *a, **k))[1])
    preset = json.loads((Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json").read_text())
    r = two_prompt_rollout(tiny.tokenizer)
    n, t = r.responses.shape
    gen = torch.Generator().manual_seed(0)
    old_logprobs, advantages = -torch.rand(n, t, generator=gen) - 1.0, torch.randn(n, t, generator=gen)
    old_values, returns = torch.randn(n, t, generator=gen), torch.randn(n, t, generator=gen)
    cfg = SimpleNamespace(temperature=1.0, clip_range=0.2, entropy_coef=0.01, loss_agg="token_mean", kl_in="reward")

    def weights(models) -> dict[str, torch.Tensor]:
        out = {}
        for name, engine in (("actor", models.actor), ("critic", models.critic)):
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                out.update({f"{name}.{k}": v.detach().clone() for k, v in engine.module.named_parameters()
                            if v.requires_grad})
        return out

    trained = {}
    for live in (1e9, 100):  # the whole model fits / not even one matrix fits
        preset["zero_optimization"]["stage3_max_live_parameters"] = live
        (tmp_path / str(live)).mkdir()
        torch.manual_seed(0)  # the same LoRA adapters
        models = in_process_models(tiny, tmp_path / str(live), deepspeed={"config": preset, "num_gpus": 1}, lora=lora)
        assert fits_live_budget(models.actor) == fits_live_budget(models.critic) == (live == 1e9)
        before, linear = weights(models), F.linear
        fetched.clear()
        for _ in range(2):
            update.actor_update(models, r, old_logprobs, advantages, cfg, old_logprobs, kl_coef=0.0)
            update.critic_update(models, r, old_values, returns, clip_range_value=0.2)
        assert bool(fetched) == (live == 100)  # per-module fetch only over the budget
        assert F.linear is linear
        for engine in (models.actor, models.critic):
            assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in engine.module.parameters())
            assert all(isinstance(m._parameters, ZeROOrderedDict) for m in engine.module.modules())
        trained[live] = weights(models)
        for side in ("actor.", "critic."):  # both models trained
            assert any(not torch.equal(v, before[k]) for k, v in trained[live].items() if k.startswith(side))

    assert trained[1e9].keys() == trained[100].keys()
    for key in trained[1e9]:
        torch.testing.assert_close(trained[1e9][key], trained[100][key], msg=key)


def test_value_model_holds_its_classifier_once():
    """The critic's and reward model's wrapper reaches the backbone and head through the classifier:
    registered twice, ZeRO-3 would hook and run every backbone module twice per pass."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from stages.ppo.engines import TokenValueModel

    classifier = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32,
                                                           n_positions=16, num_labels=1, pad_token_id=0))
    model = TokenValueModel(classifier)
    assert [name for name, _ in model.named_children()] == ["classifier"]
    assert model.backbone is classifier.transformer and model.head is classifier.score
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    assert len(names) == len(set(id(m) for m in model.modules()))
    assert list(model.state_dict()) == [f"classifier.{k}" for k in classifier.state_dict()]
