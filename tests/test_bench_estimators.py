"""`bench/ppo_step.py --estimators` (bench/estimators.py, bench/trl_grpo.py) runs and writes its table's keys.

Structure only, never timings: the smoke numbers come from 2 steps on a shared CPU and mean nothing.
The fast tests check the configs the bench hands the stage, and the report, on made-up rows; the slow
one runs the bench end to end (`rlhf run` twice and TRL's GRPOTrainer, each in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import estimators  # noqa: E402
import ppo_step  # noqa: E402

from pipeline.config import build_config  # noqa: E402

SETTING = {"paths": {"policy": "/p", "reward": "/r", "prompts": "/x.jsonl"}}


@pytest.mark.parametrize("name", estimators.ESTIMATORS)
def test_each_estimator_config_is_one_the_stage_accepts_at_equal_work(name):
    cfg = build_config(estimators.estimator_config(SETTING, name, 5, 4, 4, 16)).ppo
    assert cfg.advantage_estimator == name and cfg.uses_critic == (name == "gae")
    assert (cfg.rollout_batch_size, cfg.samples_per_prompt, cfg.minibatch_size, cfg.ppo_epochs) == (4, 4, 16, 1)
    assert cfg.min_new_tokens == cfg.max_new_tokens == 16  # every response full length
    assert cfg.kl_coef == estimators.KL_COEF
    assert cfg.kl_in == ("loss" if name == "grpo" else "reward")  # grpo: k3 in the loss, as TRL's beta


def row(step_s: float, engines: list[str], phases: dict[str, float], processes: int = 1) -> dict:
    steps = [{"step": i + 1, "time/step_s": step_s, **{f"time/{p}_s": v for p, v in phases.items()},
              "response_length": 16.0, "generated_tokens": 256} for i in range(4)]
    return {"engines": engines, "processes": processes, "wall_s": 10.0, "load_average_max": 1.0,
            **estimators.summarise(steps, 1, 16)}


def test_report_has_every_row_and_both_ratios_against_their_targets():
    rows = {"trl_grpo": row(0.5, ["policy", "reference", "reward"], {"rollout": 0.2, "score": 0.1, "update": 0.2}),
            "gae": row(0.3, ["actor", "critic", "reference", "reward"],
                       {"rollout": 0.1, "score": 0.1, "advantages": 0.0, "update": 0.1}, processes=2),
            "grpo": row(0.2, ["actor", "reference", "reward"],
                        {"rollout": 0.1, "score": 0.05, "advantages": 0.0, "update": 0.05}),
            "grpo@2": row(0.27, ["actor", "reference", "reward"],
                          {"rollout": 0.1, "score": 0.07, "advantages": 0.0, "update": 0.1}, processes=2)}
    comparison = estimators.compare(rows)
    assert comparison["ours_grpo_over_trl_grpo"] == {"ratio": pytest.approx(0.4), "target": 0.67, "met": True,
                                                     "ratio_of_fastest_steps": pytest.approx(0.4), "processes": [1, 1]}
    assert comparison["ours_grpo_over_ours_gae"] == {"ratio": pytest.approx(2 / 3), "target": 0.8, "met": True,
                                                     "ratio_of_fastest_steps": pytest.approx(2 / 3), "processes": [1, 2]}
    assert comparison["ours_grpo@2_over_ours_gae"] == {"ratio": pytest.approx(0.9), "target": 0.8, "met": False,
                                                       "ratio_of_fastest_steps": pytest.approx(0.9),
                                                       "processes": [2, 2]}
    assert rows["grpo"]["ms_per_generated_token"] == pytest.approx(1000 * 0.2 / 256)
    result = {"setting": {"prompts_per_step": 4, "samples_per_prompt": 4, "new_tokens": 16, "kl_coef": 0.05,
                          "policy_parameters": 1, "steps": 4, "warmup": 1, "repeats": 1},
              "rows": rows, "comparison": comparison, "load_start": [0, 0, 0], "load_end": [0, 0, 0]}
    text = estimators.report(result)
    for name in rows:
        assert f"  {name} " in text
    assert ("our GRPO / TRL GRPOTrainer   0.40x (target <= 0.67x): met   (fastest steps: 0.40x; processes 1 vs 1)"
            in text)
    assert "our GRPO / our PPO (gae)     0.67x (target <= 0.8x): met   (fastest steps: 0.67x; processes 1 vs 2)" in text
    assert ("our GRPO@2 / our PPO (gae)   0.90x (target <= 0.8x): NOT met   (fastest steps: 0.90x; processes 2 vs 2)"
            in text)


def test_a_row_name_may_give_its_rank_count():
    assert estimators.parse_row("grpo") == ("grpo", 1) and estimators.parse_row("grpo@2") == ("grpo", 2)
    assert [estimators.parse_row(n) for n in ("ppo", "grpo@", "grpo@x", "grpo@0")] == [None] * 4
    # gae on one CPU rank has its value process beside it; on N ranks the critic stays in each rank
    assert [estimators.processes("gae", 1), estimators.processes("grpo", 1), estimators.processes("gae", 2),
            estimators.processes("grpo", 2)] == [2, 1, 2, 2]


def test_summarise_refuses_rows_whose_token_count_is_not_the_work_asked_for():
    steps = [{"step": 2, "time/step_s": 1.0, "response_length": 16.0, "generated_tokens": 200}]
    with pytest.raises(SystemExit, match="200 tokens generated per step"):
        estimators.summarise(steps, 1, 16)


def test_unknown_estimator_and_smoke_alone_are_refused(capsys):
    for argv in (["--estimators", "gae,ppo"], ["--estimators", "grpo@x"], ["--estimators", "grpo@0"], ["--smoke"]):
        with pytest.raises(SystemExit) as err:
            ppo_step.main(argv)
        assert err.value.code == 2
    assert "--estimators: choices are gae, grpo, rloo, reinforce_pp" in capsys.readouterr().err


@pytest.mark.slow  # two `rlhf run` launches and TRL's trainer, each in a subprocess
def test_smoke_runs_and_writes_the_table_keys(tmp_path):
    out = tmp_path / "estimators.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ppo_step.py"), "--estimators", "gae,grpo", "--smoke",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["rows"]) == ["trl_grpo", "gae", "grpo"]
    assert len(result["rows"]["gae"]["engines"]) == 4 and len(result["rows"]["grpo"]["engines"]) == 3
    for name, r in result["rows"].items():
        assert r["generated_tokens_per_step"] == 4 * 4 * 16, name  # equal work: every response full length
        assert r["step_s_median"] > 0 and r["steps_measured"] == 2, name
        assert {"rollout", "score", "update"} <= set(r["phase_s_median"]), name
    assert result["rows"]["trl_grpo"]["trl"]["reference_model"] is True
    assert result["rows"]["trl_grpo"]["trl"]["dtypes"] == ["torch.float32"]
    assert set(result["comparison"]) == {"ours_grpo_over_trl_grpo", "ours_grpo_over_ours_gae"}
    for line in ("our GRPO / TRL GRPOTrainer", "our GRPO / our PPO (gae)", "ms/tok", "rollout"):
        assert line in proc.stdout
