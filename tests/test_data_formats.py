"""The user's own data and models, in process: every dataset schema recognised and checked row by row, every
source kind loaded, chat templates of real families rendered with the right loss mask, pad tokens, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import schemas
from pipeline.config import DataSection
from pipeline.errors import ConfigError, DataError
from tests import standins


def load(path, stage="sft", fmt="auto", **kw):
    from pipeline.data import load_stage_rows

    data = DataSection(train=str(path), format=fmt, **kw)
    return load_stage_rows(data, stage, split="train", data_dir=Path("."), what=stage)


# ---- shapes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, row, fmt", [
    ("sft", standins.ultrachat_rows(1)[0], "messages"),
    ("sft", {"prompt": "Q", "completion": "A"}, "prompt_completion"),
    ("sft", {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
     "prompt_completion"),
    ("sft", {"text": "plain"}, "text"),
    ("reward", standins.ultrafeedback_binarized_rows(1)[0], "conversations"),
    ("reward", standins.hh_rows(1)[0], "hh"),
    ("reward", {"prompt": "Q", "chosen": "good", "rejected": "bad"}, "preference"),
    ("reward", {"chosen": "good", "rejected": "bad"}, "preference"),
    ("ppo", standins.ultrafeedback_prompt_rows(1)[0], "prompt"),
    ("ppo", {"prompt": "Q"}, "prompt"),
    ("ppo", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}, "messages"),
    ("ppo", {"question": "Q"}, None),
])
def test_detect(stage, row, fmt):
    assert schemas.detect(stage, row) == fmt


def test_hh_text_becomes_turns():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you"
    assert schemas.parse_hh(text, "chosen") == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]
    with pytest.raises(schemas.RowProblem, match="must end with an \"Assistant:\" turn"):
        schemas.parse_hh("\n\nHuman: Hi", "chosen")
    with pytest.raises(schemas.RowProblem, match="not Anthropic HH text"):
        schemas.parse_hh("just text", "chosen")


def test_prompt_rows():
    system, user, assistant = ({"role": r, "content": r.upper()} for r in ("system", "user", "assistant"))
    assert schemas.prompt_row("messages", {"messages": [system, user, assistant]}) == {"prompt": [system, user]}
    assert schemas.prompt_row("prompt", {"prompt": [system, user]}) == {"prompt": [system, user]}
    with pytest.raises(schemas.RowProblem, match="must end with a user turn"):
        schemas.prompt_row("prompt", {"prompt": [user, assistant]})
    assert schemas.prompt_text([system, user]) == "USER"


@pytest.mark.parametrize("stage, rows, message", [
    ("sft", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "row 2: field 'completion' is missing"),
    ("sft", [{"messages": [{"role": "user", "content": "hi"}]}], "row 1: field 'messages' has no assistant turn"),
    ("sft", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}],
     "row 2: field 'completion' is an empty string"),
    ("reward", standins.ultrafeedback_binarized_rows(2) + [{"chosen": [{"role": "user", "content": "q"}],
                                                             "rejected": [{"role": "user", "content": "q"}]}],
     "row 3: field 'chosen' must be a conversation that ends with an assistant turn"),
    ("reward", standins.hh_rows(1) + [{"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q\n\nAssistant: a"}],
     "row 2: field 'chosen' must end with an \"Assistant:\" turn"),
    ("ppo", [{"prompt": [{"role": "user", "content": "q"}]}, {"prompt": [{"role": "user"}]}],
     "row 2: field 'prompt' turn 1 has no role/content"),
    ("ppo", [{"question": "q"}], "row 1: no ppo format fits the fields (question); expected `prompt` or `messages`"),
    ("sft", [{"prompt": "Hi there", "completion": "Hello."}] * 3
     + [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]}],
     "row 4: field 'prompt' is a list of turns but row 1's is a string (format 'prompt_completion')"),
    ("reward", [{"prompt": "Hi there", "chosen": "Hello.", "rejected": "Go."}] * 3
     + [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yo"}],
         "rejected": [{"role": "assistant", "content": "No"}]}],
     "row 4: field 'prompt' is a list of turns but row 1's is a string (format 'preference')"),
    ("ppo", [{"prompt": [{"role": "user", "content": "Hi"}]}, {"prompt": "Hi there"}],
     "row 2: field 'prompt' is a string but row 1's is a list of turns (format 'prompt')"),
])
def test_bad_row_names_file_row_and_field(tmp_path, stage, rows, message):
    path = standins.write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as err:
        load(path, stage)
    assert str(err.value).startswith(f"{path}: {message}")


def test_declared_format_is_checked_against_every_row(tmp_path):
    path = standins.write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "good", "rejected": "bad"}])
    with pytest.raises(DataError, match=r"row 1: field 'chosen' is not Anthropic HH text"):
        load(path, "reward", fmt="hh")
    assert load(path, "reward").format == "preference"


def test_format_key_is_validated(tmp_path):
    from pipeline.config import build_config

    with pytest.raises(ConfigError, match=r"reward\.data\.format: must be one of auto, preference, conversations, hh "
                                          r"\(got 'messages'\)"):
        build_config({"reward": {"data": {"format": "messages"}}})


# ---- sources -----------------------------------------------------------------------------------------------------

def test_every_source_kind_gives_the_same_rows(tmp_path):
    import datasets

    rows = standins.ultrafeedback_binarized_rows(5)
    flat = [{"prompt": "q", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    paths = {
        "jsonl": standins.write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
        "save_to_disk": tmp_path / "saved",
        "save_to_disk dict": tmp_path / "saved_dict",
        "hub-like folder": standins.write_hub_folder(tmp_path / "hub", {"train": rows, "test": rows[:2]}),
    }
    paths["json"].write_text(json.dumps(rows))
    ds.to_parquet(str(paths["parquet"]))
    ds.save_to_disk(str(paths["save_to_disk"]))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(paths["save_to_disk dict"]))
    expected = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    for kind, path in paths.items():
        got = load(path, "reward")
        assert got.format == "conversations", kind
        assert got.rows.to_list() == expected, kind
    csv = tmp_path / "d.csv"
    datasets.Dataset.from_list(flat).to_csv(str(csv))
    assert load(csv, "reward").rows.to_list() == flat
    with pytest.raises(DataError, match=r"saved_dict: no split 'validation' \(splits: train, test\)"):
        load(paths["save_to_disk dict"], "reward", split="validation")


def test_eval_prompts_come_from_the_eval_split_of_a_dataset_folder(tmp_path):
    from pipeline.config import build_config
    from pipeline.evaluation.evaluate import load_prompts

    folder = standins.write_hub_folder(tmp_path / "prompts", {"train": standins.ultrafeedback_prompt_rows(6),
                                                               "test": standins.ultrafeedback_prompt_rows(3, 50)})
    cfg = build_config({"ppo": {"data": {"train": str(folder), "eval": str(folder)}}})
    prompts = load_prompts(cfg, tmp_path)
    assert prompts == [r["prompt"] for r in standins.ultrafeedback_prompt_rows(3, 50)]


# ---- chat templates, pad tokens, pooling, precision ----------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello you"},
                {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure thing"}]


@pytest.mark.parametrize("family, trained", [
    ("qwen2", "Hello you<|im_end|>\nSure thing<|im_end|>\n"),
    ("llama", "Hello you<|eot_id|>Sure thing<|eot_id|>"),
    ("gemma", "Hello you<end_of_turn>\nSure thing<end_of_turn>\n"),
])
def test_loss_mask_covers_every_assistant_turn_and_its_end_marker(family, trained):
    from pipeline.chat import encode_conversation

    tokenizer = standins.make_tokenizer(family)
    encoded = encode_conversation(tokenizer, CONVERSATION)
    kept = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(kept) == trained
    assert tokenizer.decode(encoded["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_prompts_render_through_the_template_with_system_turns_kept():
    from pipeline.generation import encode_prompts

    tokenizer = standins.make_tokenizer("qwen2")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = encode_prompts(tokenizer, [prompt, "Hi"], None)
    assert tokenizer.decode(ids[0]) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                                      "<|im_start|>assistant\n"
    assert tokenizer.decode(ids[1]).startswith("<|im_start|>system\nYou are a helpful assistant.")


@pytest.mark.parametrize("family, pad", [("llama", "<|eot_id|>"), ("mistral", "<unk>"), ("gpt2", "<|endoftext|>"),
                                         ("qwen2", "<|endoftext|>")])
def test_a_missing_pad_token_is_one_of_the_tokenizers_own(family, pad):
    from pipeline.models import ensure_pad_token

    tokenizer = standins.make_tokenizer(family)
    size = len(tokenizer)
    assert ensure_pad_token(tokenizer).pad_token == pad
    assert len(tokenizer) == size  # nothing added: the embeddings keep their size


@pytest.mark.parametrize("family, eos", [("gemma", "<end_of_turn>"), ("qwen2", "<|im_end|>"), ("llama", "<|eot_id|>"),
                                         ("mistral", "</s>"), ("gpt2", "<|endoftext|>")])
def test_eos_is_the_token_that_ends_an_assistant_turn(tmp_path, family, eos):
    from pipeline.models import load_tokenizer

    tokenizer = standins.make_tokenizer(family)
    tokenizer.save_pretrained(tmp_path)
    size = len(tokenizer)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.eos_token == eos and len(loaded) == size


def test_pooled_position_is_the_last_real_token_that_is_not_pad():
    from pipeline.scoring import pooled_positions

    ids = torch.tensor([[0, 5, 6, 9, 0], [7, 8, 9, 9, 0]])  # left pad 0; 9 is EOS
    attention = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert pooled_positions(ids, attention, pad_id=0).tolist() == [3, 3]
    # pad == EOS (Llama-3): read before the EOS, as transformers' classifier pools
    assert pooled_positions(ids, attention, pad_id=9).tolist() == [2, 1]


@pytest.mark.parametrize("preset, precision, bf16, fp16", [
    ({"bf16": {"enabled": "auto"}}, "auto", False, None),  # CPU: no bf16
    ({"bf16": {"enabled": True}}, "auto", True, None),
    ({"bf16": {"enabled": True}}, "fp32", False, False),
    ({"bf16": {"enabled": "auto"}}, "bf16", True, False),
    ({"fp16": {"enabled": "auto"}}, "fp16", False, True),
    ({"fp16": {"enabled": "auto"}}, "auto", False, False),
])
def test_precision_sets_the_deepspeed_dtype(preset, precision, bf16, fp16):
    from pipeline.ds_config import resolve

    ds = resolve(preset, micro_batch=1, grad_accum=1, world_size=1, max_grad_norm=1.0, precision=precision)
    assert ds["bf16"]["enabled"] is bf16
    assert ds.get("fp16", {}).get("enabled") is fp16


def test_a_bf16_checkpoint_loads_in_fp32(tmp_path):
    from safetensors import safe_open

    from pipeline.models import load_model

    path = standins.save_checkpoint("qwen2", tmp_path / "qwen2", dtype="bfloat16")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    for kind in ("causal_lm", "seq_cls"):
        model = load_model(str(path), kind=kind, **({"num_labels": 1} if kind == "seq_cls" else {}))
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_first_row_reads_each_local_format_as_the_stage_will(tmp_path):
    from pipeline.data import first_row

    (tmp_path / "rows.json").write_text('{"prompt": "a", "n": 1}\n{"prompt": "b", "n": 2}\n')  # JSON lines
    assert first_row(tmp_path / "rows.json", "k") == {"prompt": "a", "n": 1}
    (tmp_path / "doc.json").write_text('{\n  "prompt": "a"\n}\n')
    assert first_row(tmp_path / "doc.json", "k") is None
    (tmp_path / "rows.csv").write_text("prompt,completion,n\nhi,,3\n")  # an empty cell is missing, as datasets has it
    assert first_row(tmp_path / "rows.csv", "k") == {"prompt": "hi", "completion": None, "n": "3"}
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a"}\n\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"^k: line 3: not UTF-8 text \(byte 0xff\)"):
        first_row(tmp_path / "bad.jsonl", "k")


def test_first_row_of_a_json_array_is_its_first_element(tmp_path):
    from pipeline.data import first_row

    long = "x" * (3 << 16)  # the first element ends past the first read
    (tmp_path / "array.json").write_text(f' [\n  {{"prompt": "{long}", "n": 1}},\n  {{"prompt": "b"}}\n]\n')
    assert first_row(tmp_path / "array.json", "k") == {"prompt": long, "n": 1}
    (tmp_path / "texts.json").write_text('["one", "two"]')  # datasets reads strings as rows of `text`
    assert first_row(tmp_path / "texts.json", "k") == {"text": "one"}
    for text, message in [("[]", "the JSON array has no rows"), ("[1, 2]", "line 1: expected a JSON object"),
                          ('[{"prompt": "a",', "not valid JSON")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=f"^k: {message}"):
            first_row(tmp_path / "bad.json", "k")


def test_the_first_row_of_a_json_array_is_checked_before_launch(tmp_path):
    from pipeline.data import check_first_row

    (tmp_path / "sft.json").write_text(json.dumps([{"prompt": "Hi", "answer": "Yo"}]))
    with pytest.raises(DataError, match=r"sft\.json: row 1: field 'completion' is missing"):
        check_first_row(DataSection(train=str(tmp_path / "sft.json")), "sft", "sft")


@pytest.mark.parametrize("name, text", [("rows.jsonl", '{"prompt": "Hi", "completion": "Yo"}\n'),
                                        ("rows.json", '[{"prompt": "Hi", "completion": "Yo"}]'),
                                        ("rows.csv", "prompt,completion\nHi,Yo\n")])
def test_a_byte_order_mark_is_read_past_as_the_stage_reads_past_it(tmp_path, name, text):
    from pipeline.data import check_first_row, first_row

    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert first_row(path, "k") == {"prompt": "Hi", "completion": "Yo"}
    check_first_row(DataSection(train=str(path)), "sft", "sft")
    assert load(path).rows.to_list() == [{"prompt": "Hi", "completion": "Yo"}]
    path.write_bytes(b"\xef\xbb\xbf" + text.rstrip().encode() + b"\n\xff\n")  # the UTF-8 check still reads past the mark
    line = text.rstrip().count("\n") + 2
    with pytest.raises(DataError, match=rf"^k: line {line}: not UTF-8 text \(byte 0xff\)"):
        first_row(path, "k")


def test_a_csv_cell_is_text_even_when_it_looks_like_a_number(tmp_path):
    from pipeline.data import check_first_row, first_row

    path = tmp_path / "sums.csv"
    path.write_text('prompt,completion\n"What is 2+2?","4"\n"And 0.5+0.5?",1.0\n')
    assert first_row(path, "k") == {"prompt": "What is 2+2?", "completion": "4"}
    check_first_row(DataSection(train=str(path)), "sft", "sft")
    assert load(path).rows.to_list() == [{"prompt": "What is 2+2?", "completion": "4"},
                                         {"prompt": "And 0.5+0.5?", "completion": "1.0"}]


TURNS = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]}


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "a", "completion": "b"},
      {"prompt": "3+3", "completion": 6}], "row 3: field 'completion' must be a string or a list of turns, got int"),
    ([{"prompt": "What is 2+2?", "completion": "4"}, TURNS], "row 2: field 'prompt' is a list of turns but row 1's is"),
])
def test_a_json_field_that_mixes_types_is_named_at_the_row_that_differs(tmp_path, rows, message):
    for path in (standins.write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "rows.json"):
        path.write_text(json.dumps(rows)) if path.suffix == ".json" else None
        with pytest.raises(DataError, match=f"^{path}: {message}"):
            load(path)


def test_rows_before_a_mixed_row_keep_their_text_when_it_is_past_max_samples(tmp_path):
    rows = [{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "And 1+1?", "answer": "null"},
            {"prompt": "3+3", "answer": 6}]  # datasets types `answer` as JSON and reads "4" back as 4
    path = standins.write_jsonl(tmp_path / "rows.jsonl", rows)
    got = load(path, max_samples=2, columns={"completion": "answer"})
    assert got.rows.to_list() == [{"prompt": "What is 2+2?", "completion": "4"},
                                  {"prompt": "And 1+1?", "completion": "null"}]


def test_a_column_renamed_onto_one_that_exists_takes_its_place(tmp_path):
    from pipeline.data import check_first_row

    rows = [{"prompt": "not this", "question": "Q", "completion": "A"}]
    path = standins.write_jsonl(tmp_path / "rows.jsonl", rows)
    assert load(path, columns={"prompt": "question"}).rows.to_list() == [{"prompt": "Q", "completion": "A"}]
    swapped = load(path, columns={"prompt": "question", "question": "prompt"}).rows.to_list()
    assert swapped == [{"prompt": "Q", "completion": "A"}]
    standins.write_jsonl(path, [{"prompt": "fine", "question": " ", "completion": "A"}])  # the preflight agrees
    with pytest.raises(DataError, match=r"row 1: field 'prompt' is an empty string"):
        check_first_row(DataSection(train=str(path), columns={"prompt": "question"}), "sft", "sft")
    with pytest.raises(DataError, match=r"row 1: field 'prompt' is an empty string"):
        load(path, columns={"prompt": "question"})


def test_a_dataset_saved_without_splits_has_no_split_to_choose(tmp_path):
    import datasets

    rows = [{"chosen": "good", "rejected": "bad"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert load(tmp_path / "single", "reward").rows.to_list() == rows  # the default split takes it whole
    with pytest.raises(DataError, match=r"^reward\.data\.split: .*single is one dataset saved without splits "
                                        r"\(Dataset\.save_to_disk\), so it has no split 'train_prefs'; leave "
                                        r"reward\.data\.split unset"):
        load(tmp_path / "single", "reward", split="train_prefs")
    from pipeline.data import load_stage_rows

    data = DataSection(train=str(tmp_path / "single"), eval=str(tmp_path / "single"), eval_split="test_prefs")
    with pytest.raises(DataError, match=r"^reward\.data\.eval_split: .*no split 'test_prefs'"):
        load_stage_rows(data, "reward", split="eval", data_dir=Path("."), what="reward")


def test_dataset_folders_are_checked_before_launch(tmp_path):
    import datasets
    from pipeline.data import check_first_row

    pairs = datasets.Dataset.from_list([{"chosen": "good", "rejected": "bad"}])
    datasets.DatasetDict({"train_prefs": pairs, "test_prefs": pairs}).save_to_disk(str(tmp_path / "dict"))
    pairs.save_to_disk(str(tmp_path / "single"))
    hub = standins.write_hub_folder(tmp_path / "hub", {"train": [{"chosen": "good", "good": "x"}]})

    def check(source, **kw):
        check_first_row(DataSection(train=str(source), **kw), "reward", "reward")

    check(tmp_path / "dict", split="train_prefs")
    check(tmp_path / "single")
    with pytest.raises(DataError, match=r"^reward\.data\.train: .*dict: no split 'train' \(splits: train_prefs, "
                                        r"test_prefs\)$"):
        check(tmp_path / "dict")
    with pytest.raises(DataError, match=r"^reward\.data\.split: .*single is one dataset saved without splits"):
        check(tmp_path / "single", split="train_prefs")
    with pytest.raises(DataError, match=r"hub: row 1: field 'rejected' is missing"):
        check(hub)
    with pytest.raises(DataError, match=r"^reward\.data\.train: .*hub: cannot be read as a dataset folder, split "
                                        r"'train_prefs'"):
        check(hub, split="train_prefs")
    assert sorted(p.name for p in hub.rglob("*")) == ["data", "train-00000-of-00001.parquet"]  # nothing cached
