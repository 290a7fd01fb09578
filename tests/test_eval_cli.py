"""`rlhf eval`, `generate`, `chat` and `report` on a hand-built run dir of tiny untrained models.

The run dir is written directly (tokenizer, sft/ppo/reward finals with manifests, metrics rows),
not trained through the launcher, so the commands are tested in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checkpoint import make_manifest, now, write_json
from pipeline.config import ModelArch, build_config, config_to_yaml
from pipeline.report import read_metrics

pytestmark = pytest.mark.slow  # launches the CLI or DeepSpeed ranks: not in the fast tier


ARCH = ModelArch(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
PROMPTS = ["Continue the review: This movie was", "Continue the review: I expected more from",
           "Continue the review: The acting in this film", "Continue the review: Honestly the plot",
           "Continue the review: What a waste of"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rlhf(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=900)


def write_final(stage_dir: Path, model, tokenizer, metrics: dict) -> None:
    final = stage_dir / "final"
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    manifest = make_manifest(stage=stage_dir.name, config_hash="test", stage_config={}, inputs={}, metrics=metrics,
                             started_at=now(), world_size=1)
    write_json(final / "manifest.json", manifest)


def write_metrics(stage_dir: Path, rows: list[dict]) -> None:
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForSequenceClassification

    from pipeline.models import build_model, train_tokenizer
    from pipeline.movie_reviews import load_reviews

    root = tmp_path_factory.mktemp("run")
    tokenizer = train_tokenizer([r.text for r in load_reviews()[:300]], vocab_size=500)
    write_final(root / "sft", build_model(ARCH, tokenizer, seed=1), tokenizer, {"train_loss": 3.2, "eval_loss": 3.4})
    write_final(root / "ppo", build_model(ARCH, tokenizer, seed=2), tokenizer, {"reward_mean": 0.1})
    rm_config = build_model(ARCH, tokenizer, seed=3).config
    rm_config.num_labels = 1
    write_final(root / "reward", LlamaForSequenceClassification(rm_config), tokenizer,
                {"train_loss": 0.6, "eval_accuracy": 0.75})

    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = build_config({
        "run": {"name": "evaltest", "output_dir": str(root.parent)}, "tracking": "none",
        "pretrain": {"model": vars(ARCH)},
        "eval": {"prompts": str(prompts), "num_prompts": 4, "max_new_tokens": 8},
    })
    (root / "config.yaml").write_text(config_to_yaml(cfg))

    # step 3 appears twice, as after a resume from checkpoint-2: the report keeps the later row
    write_metrics(root / "sft", [{"step": 1, "train/loss": 3.7}, {"step": 2, "train/loss": 3.4}, {"step": 3, "train/loss": 3.1}]
                  + [{"step": 3, "train/loss": 2.5}, {"step": 4, "train/loss": 2.4}, {"step": 4, "eval_loss": 2.9}])
    write_metrics(root / "reward", [{"step": s, "train/loss": 0.7 - 0.02 * s} for s in range(1, 6)])
    write_metrics(root / "ppo", [{"step": s, "ppo/policy_loss": -0.01 * s, "ppo/value_loss": 0.5 / s,
                                  "ppo/reward_mean": 0.1 * s, "ppo/kl_to_ref": 0.02 * s,
                                  "ppo/response_length": 20 - s} for s in range(1, 6)])
    return root


@pytest.fixture(scope="module")
def eval_run(run_dir) -> subprocess.CompletedProcess:
    return rlhf("eval", str(run_dir))


def test_eval_writes_results_for_sft_and_ppo_at_both_temperatures(run_dir, eval_run):
    assert eval_run.returncode == 0, eval_run.stderr
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["settings"]["temperatures"] == [0.7, 1.0]  # the configured one, then plain sampling
    assert list(results["temperatures"]) == ["0.7", "1"]
    for t, block in results["temperatures"].items():
        assert list(block["policies"]) == ["sft", "ppo"]
        for name, s in block["policies"].items():
            for key in ("judge_mean", "judge_stderr", "reward_model_mean", "distinct_2", "real_word_share", "rep_2",
                        "rep_3", "top_bigram_share", "kl_to_reference"):
                assert isinstance(s[key], float), (t, name, key)
            assert s["n"] == 4
        assert block["policies"]["sft"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # sft is the reference
        wr = block["win_rates"]["ppo"]
        assert wr["wins"] + wr["ties"] + wr["losses"] == pytest.approx(1.0)
        assert "sft" not in block["win_rates"]
        assert {"rep_2_ok", "rep_3_ok", "top_bigram_share_ok", "kl_budget_ok"} <= set(block["guards"]["ppo"])
    # no eval.fluency_text and no sft.data.eval: the fluency guard is not measured, and says so
    assert "fluency_nll_ok" not in results["temperatures"]["0.7"]["guards"]["ppo"]
    verdict = results["verdicts"]["ppo"]
    assert verdict["line"] in eval_run.stdout and "not measured: fluency_nll" in verdict["line"]
    assert results["paths"] == {name: str(run_dir / name / "final") for name in ("sft", "ppo")}
    assert results["reward_model"]["eval_accuracy"] == 0.75
    assert results["settings"]["baseline"] == "sft" and results["settings"]["n_prompts"] == 4
    # the terminal table at each temperature, and the tracker's metrics file even with tracking: none
    assert "T=0.7" in eval_run.stdout and "T=1" in eval_run.stdout and "ppo vs sft: wins" in eval_run.stdout
    logged = [json.loads(line) for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    for t in ("0.7", "1"):
        assert logged[-1][f"eval/T{t}/ppo/judge_mean"] == results["temperatures"][t]["policies"]["ppo"]["judge_mean"]
    assert logged[-1]["eval/ppo/verdict"] == verdict["line"]
    assert logged[-1]["eval/reward_model/eval_accuracy"] == 0.75


STUFFING = "the best the best great the best love the best the best great the best love the best"


@pytest.fixture(scope="module")
def hacked_run(run_dir, tmp_path_factory) -> Path:
    """A run whose ppo policy stuffs keywords, as a policy trained against a reward that pays for one
    phrase ends up writing: the sft model fine-tuned to answer every prompt with praise-word repeats."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import encode_prompts

    root = tmp_path_factory.mktemp("hacked") / "run"
    shutil.copytree(run_dir, root, ignore=shutil.ignore_patterns("eval", "report"))
    tok = AutoTokenizer.from_pretrained(root / "sft" / "final")
    model = AutoModelForCausalLM.from_pretrained(root / "sft" / "final")
    stuffed = tok(STUFFING, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p[-12:] + stuffed for p in encode_prompts(tok, PROMPTS, None)])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "ppo" / "final")  # its manifest stays: a complete ppo stage
    config = root / "config.yaml"  # responses long enough to hold a few phrases
    config.write_text(config.read_text().replace("max_new_tokens: 8", "max_new_tokens: 24"))
    return root


def test_eval_flags_a_keyword_stuffing_policy(hacked_run):
    result = rlhf("eval", str(hacked_run))
    assert result.returncode == 0, result.stderr  # by default it only reports
    results = json.loads((hacked_run / "eval" / "results.json").read_text())
    verdict = results["verdicts"]["ppo"]
    assert not verdict["win"] and {"rep_2", "top_bigram_share"} <= set(verdict["hacking_suspected"]), verdict
    assert "ppo vs sft: reward hacking suspected: " in result.stdout and verdict["line"] in result.stdout
    for block in results["temperatures"].values():
        assert block["policies"]["ppo"]["top_bigram"] in ("the best", "best the", "best great", "great the")
        assert block["policies"]["ppo"]["rep_2"] > block["policies"]["sft"]["rep_2"] + 0.05

    strict = rlhf("eval", str(hacked_run), "--strict")
    assert strict.returncode == 2, strict.stderr
    last = strict.stderr.strip().splitlines()[-1]  # after the models' loading bars: one error line
    assert last.startswith("error: --strict: reward hacking suspected: ppo: ") and "rep_2" in last, last
    assert (hacked_run / "eval" / "results.json").exists()  # written before the refusal


def test_eval_plain_sampling_off_samples_once(run_dir, tmp_path):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(run_dir, root)
    config = root / "config.yaml"
    config.write_text(config.read_text().replace("plain_sampling: true", "plain_sampling: false"))
    result = rlhf("eval", str(root))
    assert result.returncode == 0, result.stderr
    assert list(json.loads((root / "eval" / "results.json").read_text())["temperatures"]) == ["0.7"]


def test_eval_prompts_and_seed_flags_replace_the_config_for_one_evaluation(run_dir, tmp_path):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(run_dir, root)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Continue the review: Two hours of",
                                                                        "Continue the review: My kids loved"]))
    result = rlhf("eval", str(root), "--prompts", str(other), "--seed", "99")
    assert result.returncode == 0, result.stderr
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["settings"]["prompts"] == str(other) and results["settings"]["seed"] == 99
    block = results["temperatures"]["0.7"]
    assert results["settings"]["n_prompts"] == 2 and block["policies"]["ppo"]["n"] == 2
    assert {s["prompt"] for s in block["samples"]["ppo"]} == {"Continue the review: Two hours of",
                                                              "Continue the review: My kids loved"}
    assert "eval:" in (root / "config.yaml").read_text() and str(other) not in (root / "config.yaml").read_text()

    refused = rlhf("eval", str(root), "--prompts", "movie-reviews:no_such_split")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "--prompts" in refused.stderr and "movie-reviews:heldout_prompts" in refused.stderr


def _with_judge(run_dir: Path, root: Path, judge: Path) -> Path:
    """A copy of the run dir (no evaluation yet) whose config names `judge` as eval.judge."""
    import shutil

    shutil.copytree(run_dir, root, ignore=shutil.ignore_patterns("eval", "report"))
    config = root / "config.yaml"
    assert "judge: vader" in config.read_text()
    config.write_text(config.read_text().replace("judge: vader", f"judge: {judge}"))
    return root


@pytest.mark.parametrize("where", ["the run's reward final", "a copy elsewhere"])
def test_the_reward_model_ppo_optimised_is_refused_as_its_own_judge(run_dir, tmp_path, where):
    import shutil

    judge = tmp_path / "run" / "reward" / "final"
    if where == "a copy elsewhere":  # the same weights under another path are the same model
        judge = tmp_path / "copy_of_the_reward_model"
        shutil.copytree(run_dir / "reward" / "final", judge)
    root = _with_judge(run_dir, tmp_path / "run", judge)
    result = rlhf("eval", str(root))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(f"error: eval.judge: {judge} is the reward model PPO optimised")
    assert not (root / "eval" / "results.json").exists()


def test_a_gold_reward_model_judges(run_dir, tmp_path):
    from transformers import LlamaForSequenceClassification

    from pipeline.models import build_model, load_tokenizer

    tokenizer = load_tokenizer(str(run_dir / "sft" / "final"))
    config = build_model(ARCH, tokenizer, seed=4).config
    config.num_labels = 1
    gold = tmp_path / "gold"
    write_final(gold, LlamaForSequenceClassification(config), tokenizer, {})
    root = _with_judge(run_dir, tmp_path / "run", gold / "final")
    result = rlhf("eval", str(root))
    assert result.returncode == 0, result.stderr
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["settings"]["judge"] == str(gold / "final")
    for block in results["temperatures"].values():
        scores = [s["judge"] for s in block["samples"]["ppo"]]
        assert all(isinstance(x, float) for x in scores) and len(set(scores)) > 1  # a model's scores, not VADER's 0.0s
        assert block["policies"]["ppo"]["judge_mean"] != block["policies"]["ppo"]["reward_model_mean"]


def test_eval_missing_run_dir_is_one_line_error(tmp_path):
    missing = tmp_path / "no-such-run"
    result = rlhf("eval", str(missing))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(missing) in result.stderr


def test_eval_include_base_without_pretrain_is_one_line_error(run_dir):
    result = rlhf("eval", str(run_dir), "--include-base")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "pretrain" in result.stderr


def test_generate_names_the_bad_line_of_a_prompts_file(run_dir, tmp_path):
    for text, message in (('{"prompt": "a"}\n\n{"prompt": oops}\n', ":3: not JSON ("),
                          ('{"prompt": "a"}\n["b"]\n', ":2: needs a string field 'prompt'")):
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(text)
        result = rlhf("generate", str(run_dir / "ppo" / "final"), "--prompts", str(prompts))
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert f"--prompts: {prompts}{message}" in result.stderr


def test_generate_writes_one_row_per_prompt(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The film\n\nA bad\nGreat acting\n")
    out = tmp_path / "out.jsonl"
    result = rlhf("generate", str(run_dir / "ppo" / "final"), "--prompts", str(prompts), "--out", str(out),
                  "--max-new-tokens", "6", "--batch-size", "2", "--seed", "3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The film", "A bad", "Great acting"]
    assert all(isinstance(r["response"], str) for r in rows)


def test_chat_with_piped_stdin(run_dir):
    result = rlhf("chat", str(run_dir / "sft" / "final"), "--max-new-tokens", "6", "--system", "Be kind.",
                  stdin="hello\n/reset\ngreat movie\n/exit\nnot read\n")
    assert result.returncode == 0, result.stderr
    assert sum(line.startswith("assistant:") for line in result.stdout.splitlines()) == 2
    assert "(conversation cleared)" in result.stdout


def test_report_writes_pngs_and_markdown(run_dir, eval_run):
    from matplotlib.image import imread

    result = rlhf("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    report_dir = run_dir / "report"
    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    assert pngs == ["eval_judge.png", "ppo_loss.png", "ppo_training.png", "reward_loss.png", "sft_loss.png"]
    for name in pngs:
        path = report_dir / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.shape[0] > 0 and image.shape[1] > 0
    md = (report_dir / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in md
    assert "| policy | judge_mean" in md and "| ppo |" in md and "### T=0.7" in md and "### T=1" in md
    assert "**ppo vs sft:" in md and "| prompt | sft | ppo |" in md  # the verdict, and responses side by side
    assert "| eval_accuracy | 0.75 |" in md  # the reward stage's manifest metrics
    assert "pretrain: not run" in md  # a missing piece is a note, not a crash


def test_best_of_n_bench_runs_on_the_run_dir_and_places_the_ppo_policy_beside_it(run_dir, eval_run, tmp_path):
    """`bench/best_of_n.py`: the reward model's best-of-n frontier at both eval temperatures, with the run's
    own PPO evaluation beside it (same prompts and seed as results.json)."""
    out = tmp_path / "bon.json"
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "best_of_n.py"),
                             str(run_dir), "--n", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    evaluated = json.loads((run_dir / "eval" / "results.json").read_text())
    assert sorted(report["temperatures"]) == sorted(evaluated["temperatures"]) == ["0.7", "1"]
    for key, block in report["temperatures"].items():
        assert [row["n"] for row in block["rows"]] == [1, 2, 4]
        for row in block["rows"]:
            for pick in ("rm_pick", "judge_pick"):
                assert row[pick]["n"] == 4  # the four prompts of the config
                assert row[pick]["wins"] + row[pick]["ties"] + row[pick]["losses"] == pytest.approx(1.0)
        # the judge picking its own best can only gain on the baseline as n grows
        judge_wins = [row["judge_pick"]["wins"] + row["judge_pick"]["ties"] for row in block["rows"]]
        assert judge_wins == sorted(judge_wins)
        assert block["ppo"]["win_rate"] == evaluated["temperatures"][key]["win_rates"]["ppo"]["win_rate"]
    assert "ppo" in result.stdout and "KL <=" in result.stdout


def test_best_of_n_bench_lets_more_reward_models_their_mean_and_a_bag_of_words_probe_pick(run_dir, tmp_path):
    """`--pickers` with the run's own reward model under two names: each, and their mean, pick exactly as the
    run's reward model does; `--bag-of-words PAIRS` fits the probe on the pairs given and picks too."""
    (tmp_path / "again").symlink_to(run_dir / "reward" / "final")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "p", "chosen": c, "rejected": r}) + "\n" for c, r in
                             [("a great film", "a bad film"), ("great acting", "bad acting")] * 2))
    out = tmp_path / "bon.json"
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "best_of_n.py"),
                             str(run_dir), "--n", "4", "--out", str(out),
                             "--pickers", f"{run_dir / 'reward' / 'final'},{tmp_path / 'again'}",
                             "--bag-of-words", str(pairs)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for block in json.loads(out.read_text())["temperatures"].values():
        pickers = block["pickers"]
        assert list(pickers) == ["run's reward model", "final", "again", "bag-of-words", "mean of final+again"]
        for name in ("final", "again", "mean of final+again"):
            assert pickers[name] == pickers["run's reward model"]
        for name, picker in pickers.items():
            assert 0.0 <= picker["judge_agreement"] <= 1.0 or picker["judge_agreement"] != picker["judge_agreement"]
            assert sorted(picker["win_by_n"]) == ["1", "2", "4"]
            assert picker["win_by_n"]["1"] == block["rows"][0]["rm_pick"]  # one candidate: every picker takes it
    assert "agreement" in result.stdout


def test_metrics_keep_the_last_row_of_a_repeated_step(run_dir):
    metrics = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert metrics["train/loss"] == [(1, 3.7), (2, 3.4), (3, 2.5), (4, 2.4)]
    assert metrics["eval_loss"] == [(4, 2.9)]


def test_end_of_run_reuses_the_ppo_stage_evaluation_only_when_nothing_differs(run_dir, eval_run, tmp_path):
    """`rlhf run` does not generate twice: it takes the ppo stage's own evaluation when it judged the same
    sft and ppo checkpoints, with the same reward model, prompts and settings; anything else re-runs it."""
    import shutil

    from pipeline.evaluation.evaluate import eval_settings
    from pipeline.evaluation.rundir import ppo_stage_evaluation
    from pipeline.rundir import load_run_config
    from pipeline.rundir import RunDir

    root = tmp_path / "run"
    shutil.copytree(run_dir, root)
    rd, cfg = RunDir(root), load_run_config(RunDir(root))
    stage_eval = json.loads((run_dir / "eval" / "results.json").read_text())
    stage_eval["paths"] = {name: str(root / name / "final") for name in ("sft", "ppo")}
    manifest = json.loads((root / "ppo" / "final" / "manifest.json").read_text())
    manifest["inputs"] = {"actor": {"path": str(root / "sft" / "final"), "config_hash": "test"},
                          "reward_model": {"path": str(root / "reward" / "final"), "config_hash": "test"}}
    manifest["evaluation"] = stage_eval
    write_json(root / "ppo" / "final" / "manifest.json", manifest)

    assert stage_eval["settings"] == eval_settings(cfg, 4)
    assert ppo_stage_evaluation(rd, cfg, 4) == stage_eval
    assert ppo_stage_evaluation(rd, cfg, 3) is None  # fewer prompts
    cfg.eval.prompts = str(root / "other_prompts.jsonl")
    assert ppo_stage_evaluation(rd, cfg, 4) is None  # other prompts
    cfg.eval.prompts = stage_eval["settings"]["prompts"]
    cfg.eval.seed += 1
    assert ppo_stage_evaluation(rd, cfg, 4) is None  # other sampling
    cfg.eval.seed -= 1
    manifest["inputs"]["actor"]["config_hash"] = "an older sft"
    write_json(root / "ppo" / "final" / "manifest.json", manifest)
    assert ppo_stage_evaluation(rd, cfg, 4) is None  # ppo was trained from another sft than the run's
