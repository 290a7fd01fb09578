"""The prepared GPU check runs end to end on CPU (`bench/gpu_check.sh --smoke`) and writes every field.

Structure and signs only: the smoke numbers come from a tiny fp32 model on a shared CPU and mean nothing,
and nothing here depends on how long anything took.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds four DeepSpeed engines in a subprocess

ROOT = Path(__file__).resolve().parents[1]
ROLLOUT_PATHS = ("ours_gathered", "deepspeed_fetch", "hf_generate", "plain_sampler")
ENGINES = ("actor", "critic", "reference", "reward")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_check") / "nested" / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout + f"\n{out.resolve()}"


def test_smoke_prints_the_table_and_where_the_json_went(smoke):
    _, stdout = smoke
    path = stdout.rsplit("\n", 1)[1]
    assert f"JSON written to {path}" in stdout
    for heading in ("ours gathered", "DS fetch", "HF gen", "BW bound", "actor MFU", "peak MiB"):
        assert heading in stdout


def test_smoke_json_has_every_field(smoke):
    result, _ = smoke
    assert result["smoke"] is True
    assert result["settings"]["device"] == "cpu" and result["settings"]["dtype"] == "float32"
    assert result["settings"]["world_size"] == 1 and result["settings"]["zero_stage"] == 3
    device = result["device"]
    for key in ("bandwidth_bytes_per_s", "peak_flops", "measured_bandwidth_bytes_per_s", "measured_matmul_flops"):
        assert positive(device[key]), key
    assert device["bandwidth_source"].startswith("measured")  # no data-sheet row for a CPU
    assert list(result["models"]) == ["smoke"]
    model = result["models"]["smoke"]
    assert positive(model["parameters"]) and model["weight_bytes"] == 4 * model["parameters"]  # fp32

    rollout = model["rollout"]
    for path in ROLLOUT_PATHS:
        r = rollout[path]
        for key in ("tokens_per_s", "seconds", "ms_per_token_step", "peak_mib", "fraction_of_bound"):
            assert positive(r[key]), (path, key)
        s = result["settings"]
        assert r["tokens"] == s["batch"] * s["new_tokens"], path  # every row ran to full length
    bound = rollout["bandwidth_bound"]
    assert bound["weight_bytes"] == model["weight_bytes"]
    assert bound["tokens_per_s"] == pytest.approx(
        result["settings"]["batch"] * device["bandwidth_bytes_per_s"] / model["weight_bytes"])

    update = model["update"]
    for key in ("actor_step_s", "critic_step_s", "actor_mfu", "critic_mfu", "actor_tflops"):
        assert positive(update[key]), key
    assert update["actor_mfu"] < 1 and update["critic_mfu"] < 1
    s = result["settings"]
    assert update["tokens"] == update["minibatch"] * (s["prompt_len"] + s["new_tokens"])
    assert math.isfinite(update["policy_loss"])

    assert set(model["memory"]) == set(ENGINES)
    for name, mem in model["memory"].items():
        assert positive(mem["params_mib"]) and positive(mem["peak_mib"]), name
        assert isinstance(mem["added_on_build_mib"], (int, float)), name
    for trained in ("actor", "critic"):  # at least Adam's two moments
        assert model["memory"][trained]["optimizer_state_mib"] >= 1.99 * model["memory"][trained]["params_mib"]
    for frozen in ("reference", "reward"):
        assert model["memory"][frozen]["optimizer_state_mib"] == 0
