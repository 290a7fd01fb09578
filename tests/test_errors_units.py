"""Failure handling checked without a launch (fast tier): the tracker falls back to offline with one warning,
the NaN check always sees the last step, a model's remote code is not run unless configured, and identical
preference pairs are kept with a warning that counts them. The cases with a run are in tests/test_errors.py
and tests/test_errors_training.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.config import TrackingSection, load_config
from tests.conftest import TINY


def test_identical_pairs_are_warned_about_with_a_count(capsys):
    from types import SimpleNamespace

    from datasets import Dataset

    from pipeline.data import StageRows
    from stages.reward import prepare

    rows = Dataset.from_list([{"chosen": "a", "rejected": "a"}, {"chosen": "a", "rejected": "b"},
                              {"chosen": "c", "rejected": "c"}])
    data = StageRows(rows, "preference", "pairs.jsonl")
    assert prepare(data, SimpleNamespace(chat_template=None), "train", is_main=True) is rows  # kept, not dropped
    assert "warning: 2 of 3 train pairs have chosen == rejected" in capsys.readouterr().out


class FakeRun:
    def __init__(self, stage_dir: Path, fail_logs: bool):
        self.dir = str(stage_dir / "wandb" / "offline-run-x" / "files")
        self.summary: dict = {}
        self.fail_logs = fail_logs

    def log(self, metrics, step=None):
        if self.fail_logs:
            raise ConnectionError("connection reset")

    def finish(self):
        pass


def test_unreachable_tracker_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from pipeline.tracking import make_tracker

    modes = []

    def init(mode, **settings):
        modes.append(mode)
        if mode == "online":
            raise ConnectionError("api.wandb.ai: Name or service not known\n(retried 3 times)")
        return FakeRun(tmp_path, fail_logs=len(modes) > 2)

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=lambda **kw: kw))
    monkeypatch.setattr("pipeline.tracking.wandb_reachable", lambda: None)  # the server answers; wandb.init fails
    tracker = make_tracker(TrackingSection(mode="online"), rank=0, run_name="tiny", stage="sft", stage_dir=tmp_path,
                           config={})
    assert modes == ["online", "offline"] and tracker.mode == "offline"
    for step in (1, 2):
        tracker.log({"train/loss": 1.0}, step=step)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "W&B online failed (api.wandb.ai" in warnings[0] and "offline" in warnings[0]

    broken = make_tracker(TrackingSection(mode="offline"), rank=0, run_name="tiny", stage="sft", stage_dir=tmp_path,
                          config={})  # a run whose every call fails: training goes on, one warning
    for step in (3, 4, 5):
        broken.log({"train/loss": 1.0}, step=step)
    broken.finish()
    assert capsys.readouterr().err.count("warning: W&B logging failed") == 1
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]  # every step still reaches metrics.jsonl


def test_remote_code_is_not_run_unless_configured(tmp_path):
    from pipeline import models
    from pipeline.errors import UserError

    marker = tmp_path / "code_ran"
    model = tmp_path / "remote"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "remote-test", "architectures": ["RemoteModel"],
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"}}))
    (model / "remote.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    assert load_config(TINY).run.trust_remote_code is False
    with pytest.raises(UserError, match=str(model)) as info:
        models.load_model(str(model), what="sft.input")
    assert info.value.exit_code == 2
    assert not marker.exists()


def test_the_last_step_is_always_logged_so_its_loss_is_checked_and_reported():
    """A run shorter than logging_steps still logs (and NaN-checks) its last step before the hand-off save."""
    from types import SimpleNamespace

    from pipeline.hf_training import FiniteLossGuard

    guard = FiniteLossGuard.__new__(FiniteLossGuard)
    for step, save, logged in ((19, False, False), (10, True, True), (20, False, True)):
        control = SimpleNamespace(should_save=save, should_log=False)
        guard.on_step_end(None, SimpleNamespace(global_step=step, max_steps=20), control)


def quick_cases(tmp_path: Path) -> dict[str, Path]:
    """Tokenizer folders whose size the preflight reads without transformers: each family's stand-in, one with
    tokens added, and ones whose tokenizer_config.json names special tokens the vocabulary lacks."""
    from tests.standins import FAMILIES, make_tokenizer

    folders = {}
    for family in FAMILIES:
        make_tokenizer(family).save_pretrained(folders.setdefault(family, tmp_path / family))
    tok = make_tokenizer("llama")
    tok.add_tokens(["<tool>", "<think>"])
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    tok.save_pretrained(folders.setdefault("added", tmp_path / "added"))
    for name, changes in {"new-pad": {"pad_token": "<pad_new>"},
                          "new-extras": {"extra_special_tokens": ["<x1>", "<x2>", "<|eot_id|>"]},
                          "extras-by-name": {"extra_special_tokens": {"tool_token": "<tool_x>"}},
                          "known-pad": {"pad_token": "<|eot_id|>"}}.items():
        folder = tmp_path / name
        make_tokenizer("llama").save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
        folders[name] = folder
    return folders


def test_the_preflight_counts_a_tokenizer_as_transformers_does(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.preflight import quick_tokenizer_size

    sizes = {name: (quick_tokenizer_size(folder), len(AutoTokenizer.from_pretrained(folder)))
             for name, folder in quick_cases(tmp_path).items()}
    assert all(quick == exact for quick, exact in sizes.values()), sizes
    assert sizes["added"][0] == sizes["llama"][0] + 3 and sizes["new-pad"][0] == sizes["llama"][0] + 1
    assert sizes["new-extras"][0] == sizes["llama"][0] + 2 and sizes["known-pad"][0] == sizes["llama"][0]
    assert sizes["extras-by-name"][0] == sizes["llama"][0] + 1
    assert quick_tokenizer_size(tmp_path) is None  # no tokenizer.json: the exact count decides


def test_a_tokenizer_that_fits_is_checked_without_importing_transformers(tmp_path):
    import subprocess

    from tests.standins import make_tokenizer

    folder = tmp_path / "qwen2"
    make_tokenizer("qwen2").save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 512}))
    code = ("import sys; from pathlib import Path; from pipeline.preflight import check_tokenizer_fits; "
            f"check_tokenizer_fits(Path({str(folder)!r}), Path({str(folder)!r}), 'sft.input'); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr


def test_eval_data_errors_name_the_option_or_key_the_user_gave(tmp_path):
    """`rlhf eval --prompts` names --prompts; the eval section's own sources name eval.prompts and
    eval.fluency_text, not a stage's `<stage>.data.<split>`."""
    from pipeline.data import data_key
    from pipeline.errors import UserError
    from pipeline.evaluation.rundir import held_out_prompts
    from pipeline.rundir import RunDir

    with pytest.raises(UserError, match=r"^--prompts: data file not found: missing\.jsonl$"):
        held_out_prompts(load_config(TINY), RunDir(tmp_path), None, "missing.jsonl")
    assert data_key("eval.prompts", "eval") == "eval.prompts" and data_key("sft", "eval") == "sft.data.eval"


@pytest.mark.parametrize("config, positions", [
    ({"model_type": "gpt2", "n_positions": 1024}, 1024),  # learned: an index past them fails mid-step
    ({"model_type": "opt", "max_position_embeddings": 2048}, 2048),
    ({"model_type": "llama", "max_position_embeddings": 2048, "rope_parameters": {"rope_theta": 1e4}}, None),
    ({"model_type": "qwen2", "max_position_embeddings": 32768, "rope_theta": 1e6}, None),  # older config.json
    ({"model_type": "falcon", "alibi": True, "max_position_embeddings": 2048}, None),
    ({"model_type": "bloom"}, None),
])
def test_only_learned_positions_limit_the_sequence(config, positions):
    """Rotary and ALiBi models run sequences past max_position_embeddings (however well): not refused."""
    from pipeline.preflight import learned_positions

    assert learned_positions(config) == positions


NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                      "{{ raise_exception('System role not supported') }}{% endif %}"
                      "<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_chat_template_that_refuses_a_row_is_one_line_naming_it():
    """Gemma's template raises on a system turn, Llama-2's on roles that do not alternate: SFT messages, SFT
    prompt/completion turns and reward pairs name the row (4 here) instead of a jinja2 traceback in TRL."""
    from datasets import Dataset

    from pipeline.data import StageRows
    from pipeline.errors import DataError
    from stages.reward import prepare
    from stages.sft import training_rows
    from tests.standins import make_tokenizer

    tokenizer = make_tokenizer("llama")
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    user, assistant = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    system = {"role": "system", "content": "Be brief."}
    messages = [[user, assistant]] * 3 + [[system, user, assistant]]
    sft_rows = {
        "messages": ("messages", {"messages": messages}),
        "prompt_completion": ("prompt' + 'completion", {"prompt": [m[:-1] for m in messages],
                                                        "completion": [[assistant]] * 4}),
    }
    for fmt, (field, columns) in sft_rows.items():
        with pytest.raises(DataError) as err:
            training_rows(StageRows(Dataset.from_dict(columns), fmt, "chats.jsonl"), tokenizer)
        assert str(err.value) == (f"chats.jsonl: row 4: the chat template of {tokenizer.name_or_path} refuses the "
                                  f"turns of field '{field}': System role not supported")
    pairs = Dataset.from_dict({"prompt": [m[:-1] for m in messages], "chosen": [[assistant]] * 4,
                               "rejected": [[{"role": "assistant", "content": "No."}]] * 4})
    with pytest.raises(DataError, match=r"^pairs.jsonl: row 4: .* field 'chosen': System role not supported$"):
        prepare(StageRows(pairs, "conversations", "pairs.jsonl"), tokenizer, "train", is_main=True)
    ordinary = Dataset.from_dict({"messages": messages[:3]})
    assert len(training_rows(StageRows(ordinary, "messages", "chats.jsonl"), tokenizer)) == 3
