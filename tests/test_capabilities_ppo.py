"""What the PPO options promise, checked by their effect inside real stage runs: the EMA actor, the adaptive
KL controller, the k2/k3 KL estimators, reward normalisation across a resume, a LoRA actor under ZeRO-3, and
`ppo.actor_deepspeed`.

Two runs of the stage, in this process (tests/inprocess.py: the orchestrator as `rlhf run` runs it, the
launcher replaced by a call of the worker), on the 2-layer width-32 Llama of tests/test_ppo_stage.py:

  features  ZeRO-0, 3 steps with a checkpoint after each: EMA (decay 0.5), adaptive KL, k3, reward
            normalisation; then resumed from its checkpoint-1 in a copy of its run dir
  lora      LoRA actor, deepspeed.config zero2 with `ppo.actor_deepspeed` putting the actor under ZeRO-3; k2

Spies on the loop's own functions keep what each step computed (log-probs, masks, raw and normalised
scores), so the logged numbers can be checked against the formulas they should follow.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.inprocess import assert_merged_lora, launcher_in_process, spy
from tests.test_ppo_stage import LORA, Tiny, metric_rows, tiny, without_time, write_config

pytestmark = pytest.mark.slow  # trains the PPO stage

__all__ = ["tiny"]  # module fixture: the tiny policy and reward model

ROLLOUT = 8  # prompts per step
DECAY = 0.5
KL_COEF, TARGET_KL, HORIZON = 0.05, 0.02, 16


@dataclass
class Steps:
    """What the loop's functions saw and returned, one entry per step."""

    shaped: list = field(default_factory=list)  # (raw scores [B], scores after normalisation [B])
    kl: list = field(default_factory=list)  # (logprobs - ref_logprobs [B, T], mask [B, T], kl_coef, kl [B, T])
    actor_state: list = field(default_factory=list)  # what export saved from the actor engine


def run_ppo(run_dir: Path, config: Path | None = None, resume_from: Path | None = None) -> Steps:
    from pipeline.orchestrator import resume_pipeline, run_pipeline
    from stages.ppo import experience, export

    shaped, kl, saved = [], [], []
    with launcher_in_process() as mp:
        spy(mp, experience, "shape_scores", shaped)
        spy(mp, experience, "advantages", kl)
        spy(mp, export, "full_state_dict", saved)
        if resume_from is None:
            run_pipeline(str(config), [], "ppo", str(run_dir))
        else:
            resume_pipeline(str(run_dir), "ppo", str(resume_from), False)
    steps = Steps()
    steps.shaped = [(args[0], result) for args, _, result in shaped]
    # advantages(scores, shaped scores, rollout, cfg, kl_coef) -> Advantages
    steps.kl = [(args[0].logprobs - args[0].ref_logprobs, args[2].mask, args[4], result.kl) for args, _, result in kl]
    steps.actor_state = [result for _, _, result in saved]
    return steps


def prompts_file(root: Path) -> Path:
    """Review openings as PPO prompts, in a file: no movie-reviews splits to prepare."""
    from pipeline.movie_reviews import load_reviews

    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(r.text.split()[:6])}) + "\n" for r in load_reviews()[:32]))
    return path


def ppo_config(root: Path, tiny: Tiny, **settings: Any) -> Path:
    data = str(prompts_file(root))
    return write_config(root / "ppo.yaml", tiny, eval_enabled=False, data={"train": data, "eval": data},
                        rollout_batch_size=ROLLOUT, minibatch_size=4, ppo_epochs=1, **settings)


@dataclass
class Run:
    run_dir: Path
    steps: Steps


@pytest.fixture(scope="module")
def features(tiny, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("features")
    config = ppo_config(root, tiny, max_steps=3, save_steps=1, keep_checkpoints=3, ema_decay=DECAY,
                        adaptive_kl=True, kl_coef=KL_COEF, target_kl=TARGET_KL, kl_horizon=HORIZON,
                        kl_estimator="k3", normalize_reward=True)
    return Run(root / "run", run_ppo(root / "run", config))


@pytest.fixture(scope="module")
def resumed(features, tmp_path_factory) -> Run:
    """The features run again from its checkpoint-1, in a copy of its run dir without the later results."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(features.run_dir, run_dir)
    for later in ("final", "checkpoint-2"):
        shutil.rmtree(run_dir / "ppo" / later)
    return Run(run_dir, run_ppo(run_dir, resume_from=run_dir / "ppo" / "checkpoint-1"))


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("lora")
    config = ppo_config(root, tiny, deepspeed={"config": "zero2", "num_gpus": 1}, lora=LORA,
                        actor_deepspeed={"zero_optimization": {"stage": 3}}, kl_estimator="k2",
                        max_steps=2, save_steps=None)
    return Run(root / "run", run_ppo(root / "run", config))


@pytest.fixture(scope="module")
def lora_ema(tiny, tmp_path_factory) -> Run:
    """LoRA merged into the hand-off, with an EMA: two steps, a checkpoint (and its EMA) after the first."""
    root = tmp_path_factory.mktemp("lora_ema")
    config = ppo_config(root, tiny, lora=LORA, ema_decay=DECAY, max_steps=2, save_steps=1)
    return Run(root / "run", run_ppo(root / "run", config))


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def ppo_state(run_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((run_dir / "ppo" / f"checkpoint-{step}" / "rlhf_complete.json").read_text())


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "ppo" / "final" / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# EMA


def test_ema_is_the_decayed_average_of_the_actor_after_each_step(features, tiny):
    """ema_1 = d * actor_0 + (1 - d) * actor_1 (the EMA starts at the initial actor), and after the last step
    final/ema = d * ema_2 + (1 - d) * final actor: it differs from the actor by d * (ema_2 - actor_3).
    Each checkpoint holds its EMA as checkpoint-N/ema.safetensors, not in its marker (rlhf_complete.json)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ppo = features.run_dir / "ppo"
    actor_0 = weights(tiny.policy_dir)
    actor_1 = torch.load(ppo / "checkpoint-1" / "actor" / "state" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    ema_1, ema_2 = (load_file(ppo / f"checkpoint-{s}" / "ema.safetensors") for s in (1, 2))
    assert "ema" not in ppo_state(features.run_dir, 1)
    actor_3, ema_3 = weights(ppo / "final"), weights(ppo / "final" / "ema")
    assert ema_1.keys() == {k for k in actor_0 if k != "lm_head.weight"}  # trainable weights (lm_head is tied)
    for key in ema_1:
        torch.testing.assert_close(ema_1[key], DECAY * actor_0[key] + (1 - DECAY) * actor_1[key], rtol=0, atol=1e-7)
        torch.testing.assert_close(ema_3[key], DECAY * ema_2[key] + (1 - DECAY) * actor_3[key], rtol=0, atol=1e-7)
    assert any((ema_3[k] - actor_3[k]).abs().max() > 1e-5 for k in ema_1), "the EMA is the actor itself"
    loaded = AutoModelForCausalLM.from_pretrained(ppo / "final" / "ema")  # loadable, its head tied to the EMA
    assert torch.equal(loaded.lm_head.weight, ema_3["model.embed_tokens.weight"])
    assert manifest(features.run_dir)["ema"]["decay"] == DECAY


def test_ema_is_refused_when_an_override_puts_the_actor_under_zero3(tiny, tmp_path):
    """Under ZeRO-3 each rank holds a shard of the actor, not the weights an EMA averages: refused before
    anything is built, however the actor got there (here ppo.actor_deepspeed under the zero0 preset)."""
    from pipeline.errors import UserError
    from pipeline.orchestrator import run_pipeline

    config = ppo_config(tmp_path, tiny, ema_decay=DECAY, actor_deepspeed={"zero_optimization": {"stage": 3}})
    with launcher_in_process(), pytest.raises(UserError, match=r"ppo\.ema_decay: EMA is supported with ZeRO stages 0-2"):
        run_pipeline(str(config), [], "ppo", str(tmp_path / "run"))
    assert not (tmp_path / "run" / "ppo" / "final").exists()


# ---------------------------------------------------------------------------------------------------------------
# adaptive KL


def test_adaptive_kl_moves_the_coefficient_toward_the_target(features):
    """Each step the coefficient moves by min(max(KL / target - 1, -0.2), 0.2) * rollout / horizon of itself
    (Ziegler et al.): down while the KL is below the target, up above it; the reward uses the moved value."""
    rows = metric_rows(features.run_dir)
    coef = [rows[s]["ppo/kl_coef"] for s in (1, 2, 3)]
    kl = [rows[s]["ppo/kl_to_ref"] for s in (1, 2, 3)]
    assert coef[0] == KL_COEF and kl[0] == 0.0  # the actor starts as the reference
    assert coef[1] == pytest.approx(KL_COEF * (1 - 0.2 * ROLLOUT / HORIZON), rel=1e-12)
    for s in (0, 1):
        error = min(max(kl[s] / TARGET_KL - 1, -0.2), 0.2)
        assert coef[s + 1] == pytest.approx(coef[s] * (1 + error * ROLLOUT / HORIZON), rel=1e-12)
        assert (coef[s + 1] > coef[s]) == (kl[s] > TARGET_KL)
    assert [c for _, _, c, _ in features.steps.kl] == coef  # what the rewards were penalised with
    assert ppo_state(features.run_dir, 2)["kl_controller"]["value"] == coef[2]


# ---------------------------------------------------------------------------------------------------------------
# k2 / k3


def check_logged_kl(run: Run, estimator) -> None:
    """Per step: the per-token KL in the reward is `estimator` of the log-ratio, and the logged
    ppo/kl_estimate is its per-response sum averaged over responses (ppo/kl_to_ref stays k1's)."""
    rows = metric_rows(run.run_dir)
    assert len(run.steps.kl) == len(rows)
    for step, (log_ratio, mask, _, kl) in enumerate(run.steps.kl, start=1):
        real = mask.bool()
        torch.testing.assert_close(kl[real], estimator(log_ratio)[real])
        expected = torch.where(real, estimator(log_ratio), 0.0).sum(1).mean().item()
        assert rows[step]["ppo/kl_estimate"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert rows[step]["ppo/kl_to_ref"] == pytest.approx(torch.where(real, log_ratio, 0.0).sum(1).mean().item(),
                                                            rel=1e-5, abs=1e-9)
        if step > 1:  # the actor has moved: the estimators differ, and k2, k3 are never negative
            assert rows[step]["ppo/kl_estimate"] > 0
            assert rows[step]["ppo/kl_estimate"] != pytest.approx(rows[step]["ppo/kl_to_ref"], rel=1e-3)


def test_k3_sets_the_kl_in_the_reward_and_in_the_log(features):
    check_logged_kl(features, lambda x: torch.exp(-x) - 1 + x)  # r - 1 - log r, r = ref / actor


def test_k2_sets_the_kl_in_the_reward_and_in_the_log(lora):
    check_logged_kl(lora, lambda x: x**2 / 2)


# ---------------------------------------------------------------------------------------------------------------
# reward normalisation and resume


def test_reward_normalisation_uses_running_stats_that_resume_restores(features, resumed):
    """Each step's scores are normalised by the mean and std of every score so far (not just this batch's);
    checkpoint-1 holds those statistics, and a run resumed from it normalises steps 2 and 3 exactly as the
    uninterrupted run did, and ends with its weights, EMA and logged metrics."""
    raw_so_far = []
    for raw, normalised in features.steps.shaped:
        raw_so_far.append(raw.double())
        seen = torch.cat(raw_so_far)
        expected = (raw.double() - seen.mean()) / (seen.std(unbiased=False) + 1e-8)
        torch.testing.assert_close(normalised.double(), expected, rtol=1e-5, atol=1e-6)
    first = raw_so_far[0]
    moments = ppo_state(features.run_dir, 1)["reward_moments"]
    assert moments["count"] == ROLLOUT
    assert moments["mean"] == pytest.approx(first.mean().item(), rel=1e-6)
    assert moments["m2"] == pytest.approx(((first - first.mean()) ** 2).sum().item(), rel=1e-5)

    assert len(resumed.steps.shaped) == 2  # steps 2 and 3
    for (raw_a, out_a), (raw_b, out_b) in zip(features.steps.shaped[1:], resumed.steps.shaped):
        assert torch.equal(raw_a, raw_b) and torch.equal(out_a, out_b)
    rows_a, rows_b = metric_rows(features.run_dir), metric_rows(resumed.run_dir)
    assert [without_time(rows_b[s]) for s in (2, 3)] == [without_time(rows_a[s]) for s in (2, 3)]
    for part in ("final", "final/ema"):
        a, b = weights(features.run_dir / "ppo" / part), weights(resumed.run_dir / "ppo" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


# ---------------------------------------------------------------------------------------------------------------
# LoRA actor under ZeRO-3, set by ppo.actor_deepspeed


def test_actor_deepspeed_puts_the_actor_alone_under_zero3(lora):
    """deepspeed.config is zero2; the override makes the actor ZeRO-3, the frozen reward model follows the
    actor (README), the critic keeps the stage's preset, and the LoRA actor's base serves as the reference."""
    engines = manifest(lora.run_dir)["metrics"]["sharding"]["engines"]
    assert {name: e["zero_stage"] for name, e in engines.items()} == {"actor": 3, "critic": 2, "reward": 3}
    actor = engines["actor"]
    assert 0 < actor["trainable_total"] < actor["params_total"] / 10  # only the adapters train


def test_lora_actor_under_zero3_saves_base_plus_adapter(lora, tiny):
    """final/ is the base with W + (alpha / r) B A in every adapted matrix, A and B as the ZeRO-3 engine
    held them at the end (gathered from its partitions), and every other weight the base's own."""
    [state] = lora.steps.actor_state
    merged, base = weights(lora.run_dir / "ppo" / "final"), weights(tiny.policy_dir)
    assert manifest(lora.run_dir)["lora"] == {"merged": True}
    adapted = assert_merged_lora(merged, base, state, lambda key: "base_model.model." + key.replace(
        ".weight", ".lora_A.default.weight"), scale=LORA["alpha"] / LORA["r"])
    assert adapted == set(LORA["target_modules"])


def test_lora_ema_is_merged_like_the_actor(lora_ema, tiny):
    """With LoRA merged into final/, final/ema/ is the EMA's adapters merged into the same base: a whole model
    with its tokenizer, loaded as final/ is, not an adapter folder beside a merged model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = lora_ema.run_dir / "ppo" / "final"
    ema_1 = load_file(lora_ema.run_dir / "ppo" / "checkpoint-1" / "ema.safetensors")
    [actor_2] = lora_ema.steps.actor_state
    assert ema_1 and all("lora_" in k for k in ema_1)  # the EMA averages what trains: the adapters
    ema_adapters = {k: DECAY * ema_1[k] + (1 - DECAY) * actor_2[k] for k in ema_1}
    merged_ema, merged_actor, base = weights(final / "ema"), weights(final), weights(tiny.policy_dir)
    adapted = assert_merged_lora(merged_ema, base, ema_adapters, lambda key: "base_model.model." + key.replace(
        ".weight", ".lora_A.default.weight"), scale=LORA["alpha"] / LORA["r"])
    assert adapted == set(LORA["target_modules"])
    assert any(not torch.equal(merged_ema[k], merged_actor[k]) for k in merged_ema), "the EMA is the actor itself"
    AutoModelForCausalLM.from_pretrained(final / "ema")
    AutoTokenizer.from_pretrained(final / "ema")
    assert manifest(lora_ema.run_dir)["lora"] == {"merged": True}


# ---------------------------------------------------------------------------------------------------------------
# The evaluation after training


def test_the_engines_are_gone_before_the_evaluation_loads_its_models(tiny, tmp_path):
    """The end-of-stage evaluation loads the SFT and PPO policies and the reward model as plain models on rank 0.
    By then what the four engines held (the models' weights and gradients, the optimizers and their Adam
    states) must be collected, not kept beside them: checked with weak references to the modules and
    optimizers the stage built (ZeRO-2: all four engines in this process). Under ZeRO-3 deepspeed 0.19 keeps
    them alive after `destroy()` (measured; README says so)."""
    import weakref

    from pipeline.orchestrator import run_pipeline
    from stages.ppo import trainer

    config = write_config(tmp_path / "ppo.yaml", tiny, deepspeed={"config": "zero2", "num_gpus": 1},
                          max_steps=1, save_steps=None)
    built, alive_at_evaluation = {}, []
    build_models, evaluate = trainer.build_models, trainer.evaluate_after_training

    def build_and_watch(*args, **kwargs):
        models = build_models(*args, **kwargs)
        for name in ("actor", "critic", "reference", "reward"):
            engine = getattr(models, name)
            built[f"{name} module"] = weakref.ref(engine.module)
            if engine.optimizer is not None:
                built[f"{name} optimizer"] = weakref.ref(engine.optimizer)
        return models

    def watch_and_evaluate(ctx):
        alive_at_evaluation.extend(name for name, ref in built.items() if ref() is not None)
        return evaluate(ctx)

    with launcher_in_process() as mp:
        mp.setattr(trainer, "build_models", build_and_watch)
        mp.setattr(trainer, "evaluate_after_training", watch_and_evaluate)
        run_pipeline(str(config), [], "ppo", str(tmp_path / "run"))
    assert {"actor module", "actor optimizer", "critic optimizer", "reward module"} <= built.keys()
    assert alive_at_evaluation == []
    assert "ppo" in manifest(tmp_path / "run")["evaluation"]["temperatures"]["0.7"]["win_rates"]
