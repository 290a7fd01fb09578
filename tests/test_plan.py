"""`rlhf plan`: the per-rank memory maths against hand-computed numbers, parameter counts from configs on the
meta device, where each stage's shape comes from, and the command itself. Nothing here launches a rank;
the estimate against what ranks really held is tests/test_sharding.py::test_plan_matches_measured_sharding.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import memory
from pipeline.cli import main
from pipeline.config import LoraSection, ModelArch, load_config
from pipeline.errors import UserError
from pipeline.memory import GPU, EngineSetup, Share, engine_memory, engine_setup, lora_parameters
from pipeline.model_shapes import CAUSAL_LM, SEQ_CLS, count_parameters, meta_model, scratch_config, stage_source
from pipeline.plan import build_plan, plan_stage, ppo_ds, trained_stage_ds
from pipeline.rundir import RunDir
from tests.conftest import TINY

PPO_ON = ["ppo.enabled=true"]


def setup(stage: int, world: int, dtype: str = "fp32", opt: str = "none", param: str = "none") -> EngineSetup:
    return EngineSetup(stage, world, dtype, opt, param)


# ---------------------------------------------------------------------------------------------------------------
# 1. the maths, by hand: 1000 parameters, all trainable


def test_zero0_fp32_keeps_everything_whole_and_two_adam_moments():
    m = engine_memory(1000, 1000, setup(0, 4), trained=True)
    assert m.params == Share(1000, 4000, GPU)
    assert m.grads == Share(1000, 4000, GPU)
    assert m.optimizer == Share(2000, 8000, GPU)  # the torch optimizer steps the fp32 weights themselves
    assert m.on(GPU) == 16000


def test_zero0_bf16_adds_an_fp32_master_copy():
    m = engine_memory(1000, 1000, setup(0, 4, "bf16"), trained=True)
    assert (m.params.bytes, m.grads.bytes) == (2000, 2000)
    assert m.optimizer == Share(3000, 12000, GPU)


def test_zero1_splits_optimizer_state_only_and_keeps_a_master_copy_even_in_fp32():
    m = engine_memory(1000, 1000, setup(1, 4), trained=True)
    assert (m.params.elements, m.grads.elements) == (1000, 1000)
    assert m.optimizer == Share(750, 3000, GPU)  # 250 each: master, exp_avg, exp_avg_sq


def test_zero2_also_splits_gradients_rounding_partitions_up():
    m = engine_memory(1000, 1000, setup(2, 3, "bf16"), trained=True)
    assert m.params == Share(1000, 2000, GPU)
    assert m.grads == Share(334, 668, GPU)
    assert m.optimizer == Share(1002, 4008, GPU)


def test_zero3_offload_moves_everything_off_the_gpu():
    m = engine_memory(1000, 1000, setup(3, 8, "bf16", "cpu", "nvme"), trained=True)
    assert m.params == Share(125, 250, "nvme")
    assert m.grads == Share(125, 500, "cpu")  # the offloaded optimizer steps on fp32 host gradients
    assert m.optimizer == Share(375, 1500, "cpu")
    assert m.on(GPU) == 0 and m.on("cpu") == 2000


def test_frozen_engine_holds_parameters_only():
    m = engine_memory(1000, 1000, setup(3, 2), trained=False)
    assert m.params == Share(500, 2000, GPU)
    assert m.grads.bytes == m.optimizer.bytes == 0


def test_lora_trains_only_the_adapters():
    assert lora_parameters([(32, 32), (32, 16)], r=4) == 4 * 64 + 4 * 48
    m = engine_memory(1000, 100, setup(0, 1, "bf16"), trained=True)
    assert (m.params.elements, m.grads.elements, m.optimizer.elements) == (1000, 100, 300)


def test_engine_setup_reads_the_resolved_config_and_ignores_offload_the_stage_cannot_do():
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
          "bf16": {"enabled": True}}
    assert engine_setup(ds, 4) == EngineSetup(2, 4, "bf16", "cpu", "none")  # offload_param needs ZeRO-3
    ds = {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}, "fp16": {"enabled": True}}
    assert engine_setup(ds, 1) == EngineSetup(0, 1, "fp16", "none", "none")


def test_format_bytes():
    assert [memory.format_bytes(n) for n in (512, 2048, 3 << 20, 5 << 30)] == ["512 B", "2.00 KiB", "3.00 MiB",
                                                                               "5.00 GiB"]


# ---------------------------------------------------------------------------------------------------------------
# 2. parameter counts from configs, nothing allocated


def test_qwen25_05b_counts_as_worked_out_by_hand():
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
    embed = 151936 * 896
    attention = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896  # q, k, v with bias; o without
    layer = attention + 3 * 896 * 4864 + 2 * 896  # gate/up/down, two norms
    whole = embed + 24 * layer + 896  # tied LM head, final norm
    assert count_parameters(meta_model(cfg, CAUSAL_LM), CAUSAL_LM, None, "k").params_total == whole == 494_032_768
    assert count_parameters(meta_model(cfg, SEQ_CLS), SEQ_CLS, None, "k").params_total == whole + 896  # score head


class FakeTokenizer:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 300


ARCH = ModelArch(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def test_scratch_config_counts_what_build_model_builds():
    from pipeline.models import build_model

    built = sum(p.numel() for p in build_model(ARCH, FakeTokenizer(), seed=0).parameters())
    planned = count_parameters(meta_model(scratch_config(ARCH, 300), CAUSAL_LM), CAUSAL_LM, None, "k")
    assert planned.params_total == planned.trainable_total == built


@pytest.mark.parametrize("kind", [CAUSAL_LM, SEQ_CLS])
def test_lora_counts_match_peft(kind):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.lora import lora_config

    lora = LoraSection(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    config = scratch_config(ARCH, 300)
    config.num_labels = 1
    cls = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModelForSequenceClassification
    peft_model = get_peft_model(cls.from_config(config), lora_config(lora, kind))
    planned = count_parameters(meta_model(config, kind), kind, lora, "sft.lora")
    assert planned.params_total == sum(p.numel() for p in peft_model.parameters())
    assert planned.trainable_total == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_lora_target_the_model_lacks_is_refused():
    with pytest.raises(UserError, match="sft.lora.target_modules: .*'c_attn'"):
        count_parameters(meta_model(scratch_config(ARCH, 300), CAUSAL_LM), CAUSAL_LM,
                         LoraSection(target_modules=["c_attn"]), "sft.lora")


# ---------------------------------------------------------------------------------------------------------------
# 3. where each stage's shape comes from


def saved_model_dir(path: Path, vocab: int = 300) -> Path:
    scratch_config(ARCH, vocab).save_pretrained(path)  # config.json only: the plan reads no weights
    return path


def finished(run_dir: Path, stage: str, vocab: int) -> None:
    final = saved_model_dir(run_dir / stage / "final", vocab)
    (final / "manifest.json").write_text(json.dumps({"status": "complete", "config_hash": "x"}))


def test_stage_not_run_yet_takes_its_shape_from_the_stage_before(tmp_path):
    cfg = load_config(TINY, PPO_ON)
    source = stage_source(cfg, "ppo", "input", RunDir(tmp_path))
    assert source.origin == "sft's output, not made yet: same shape as pretrain.model, vocab <= 400 " \
                            "(pretrain.tokenizer_vocab_size)"
    assert source.config.vocab_size == 400 and source.config.hidden_size == 32


def test_finished_stage_in_the_run_dir_supplies_its_checkpoint(tmp_path):
    finished(tmp_path, "sft", vocab=380)
    source = stage_source(load_config(TINY, PPO_ON), "ppo", "input", RunDir(tmp_path))
    assert source.origin == f"sft's checkpoint {tmp_path / 'sft' / 'final'}" and source.config.vocab_size == 380


def test_critic_defaults_to_the_reward_model_and_a_given_path_wins(tmp_path):
    given = saved_model_dir(tmp_path / "critic", vocab=320)
    cfg = load_config(TINY, [*PPO_ON, f"ppo.reward_model={saved_model_dir(tmp_path / 'rm', 310)}"])
    assert stage_source(cfg, "ppo", "critic", RunDir(tmp_path / "run")).config.vocab_size == 310
    cfg = load_config(TINY, [*PPO_ON, f"ppo.critic={given}"])
    critic = stage_source(cfg, "ppo", "critic", RunDir(tmp_path / "run"))
    assert critic.config.vocab_size == 320 and critic.origin == f"ppo.critic = {given}"


def test_unresolvable_inputs_are_user_errors(tmp_path):
    cfg = load_config(TINY, ["pretrain.enabled=false"])
    with pytest.raises(UserError, match="sft.input is not set, stage 'pretrain' is disabled"):
        stage_source(cfg, "sft", "input", RunDir(tmp_path))
    with pytest.raises(UserError, match="sft.input: path not found: ./no/such/model"):
        stage_source(load_config(TINY, ["sft.input=./no/such/model"]), "sft", "input", RunDir(tmp_path))
    with pytest.raises(UserError, match="sft.input: cannot read the model config"):
        stage_source(load_config(TINY, [f"sft.input={tmp_path}"]), "sft", "input", RunDir(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# 4. the DeepSpeed configs are the ones the stages resolve


def test_trained_stage_ds_is_what_hf_training_resolves():
    from pipeline.hf_training import deepspeed_dict

    cfg = load_config(TINY, ["deepspeed.num_gpus=2", "sft.deepspeed={config: zero2, precision: bf16}",
                             "sft.grad_accum=3"])
    ctx = SimpleNamespace(deepspeed=cfg.stage_deepspeed("sft"), world_size=2, name="sft")
    assert trained_stage_ds(cfg, "sft") == deepspeed_dict(ctx, cfg.sft)


def test_ppo_ds_is_what_the_ppo_engines_resolve():
    from stages.ppo.engines import deepspeed_configs

    cfg = load_config(TINY, [*PPO_ON, "deepspeed.num_gpus=2", "deepspeed.config=zero3", "deepspeed.precision=fp16",
                             "ppo.rollout_batch_size=8", "ppo.minibatch_size=4",
                             "ppo.critic_deepspeed={zero_optimization: {stage: 1}}"])
    ctx = SimpleNamespace(section=cfg.ppo, world_size=2, deepspeed=cfg.stage_deepspeed("ppo"))
    theirs = deepspeed_configs(ctx, total_updates=10)
    assert ppo_ds(cfg) == {"actor": theirs.actor, "critic": theirs.critic, "frozen": theirs.frozen}


def test_precision_setting_decides_the_dtype_and_auto_is_fp32_without_a_bf16_gpu():
    assert memory.training_dtype(trained_stage_ds(load_config(TINY, ["deepspeed.precision=bf16"]), "sft")) == "bf16"
    assert memory.training_dtype(trained_stage_ds(load_config(TINY, ["sft.deepspeed={precision: fp16}"]), "sft")) \
        == "fp16"
    assert memory.training_dtype(trained_stage_ds(load_config(TINY), "sft")) == "fp32"  # this machine: CPU only


# ---------------------------------------------------------------------------------------------------------------
# 5. the plan and the command


def test_ppo_plan_has_four_engines_with_frozen_ones_following_the_actor(tmp_path):
    cfg = load_config(TINY, [*PPO_ON, "deepspeed.num_gpus=2", "deepspeed.config=zero3", "deepspeed.precision=bf16",
                             "ppo.rollout_batch_size=8", "ppo.minibatch_size=8"])
    plan = plan_stage(cfg, "ppo", RunDir(tmp_path))
    engines = {e.name: e for e in plan.engines}
    assert list(engines) == ["actor", "critic", "reference", "reward"]
    assert all(e.setup.zero_stage == 3 and e.setup.dtype == "bf16" for e in engines.values())
    assert engines["reference"].memory.optimizer.bytes == 0
    actor = engines["actor"]
    assert actor.memory.params.elements == -(-actor.params_total // 2)
    assert "--num_gpus 2 --master_port <free-port> --module stages.worker" in plan.command


def test_lora_ppo_has_no_reference_model(tmp_path):
    cfg = load_config(TINY, [*PPO_ON, "ppo.lora={r: 2}"])
    names = [e.name for e in plan_stage(cfg, "ppo", RunDir(tmp_path)).engines]
    assert names == ["actor", "critic", "reward"]


def test_rlhf_plan_prints_every_stage_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(TINY), *PPO_ON, "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert f"[{stage}] 1 rank(s)" in out
    assert "total (4 models)" in out and "params/rank" in out
    assert "precision auto (pretrain, sft, reward, ppo): fp32 on this machine" in out
    assert not run_dir.exists()


def test_run_dry_run_plans_instead_of_launching(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(TINY), "--dry-run", "--stages", "sft", "--run-dir", str(run_dir)])
    assert exit_.value.code == 0 and "[sft]" in capsys.readouterr().out and not run_dir.exists()


def test_plan_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(TINY), "sft.input=./no/such/model", "--stages", "sft"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == "error: sft.input: path not found: ./no/such/model"


def test_build_plan_selects_stages_like_run(tmp_path):
    _, _, plans = build_plan(str(TINY), [], "reward,sft", str(tmp_path))
    assert [p.stage for p in plans] == ["sft", "reward"]
