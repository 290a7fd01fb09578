"""The demo's movie-reviews data: split sizes, determinism, disjointness, fields, and the files it writes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline import movie_reviews
from pipeline.config import MovieReviewsSection

SMALL = MovieReviewsSection(eval_text_docs=20, sft_examples=40, sft_eval_examples=10, reward_pairs=40,
                            reward_eval_pairs=10, ppo_prompts=40, eval_prompts=10)


@pytest.fixture(scope="module")
def reviews():
    return movie_reviews.load_reviews()


@pytest.fixture(scope="module")
def splits():
    return movie_reviews.build_splits(SMALL)


def opening(text: str, cfg: MovieReviewsSection = SMALL) -> tuple[str, str]:
    """(prompt, continuation) of a review, worked out here independently of the module."""
    words = text.split()
    prompt = f"{cfg.instruction} {' '.join(words[:cfg.prompt_words])}"
    return prompt, " ".join(words[cfg.prompt_words:cfg.prompt_words + cfg.continuation_words])


def test_splits_have_the_configured_sizes(splits):
    assert set(splits) == set(movie_reviews.SPLITS)
    sizes = {name: len(rows) for name, rows in splits.items()}
    assert sizes["sft_train"] == 40 and sizes["sft_eval"] == 10
    assert sizes["reward_train"] == 40 and sizes["reward_eval"] == 10
    assert sizes["ppo_train"] == 40 and sizes["ppo_eval"] == 10
    assert sizes["pretrain_eval"] == 20 and sizes["pretrain_train"] > 1000


def test_splits_are_deterministic(splits):
    assert movie_reviews.build_splits(SMALL) == splits


def test_different_seed_gives_different_splits(splits, reviews, monkeypatch):
    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))  # skip re-reading the CSV
    other = movie_reviews.build_splits(MovieReviewsSection(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert other["sft_train"] != splits["sft_train"]


def test_rows_have_their_fields(splits):
    for name in ("pretrain_train", "pretrain_eval"):
        assert all(set(r) == {"text"} and r["text"] for r in splits[name])
    for name in ("sft_train", "sft_eval"):
        assert all(set(r) == {"prompt", "completion"} for r in splits[name])
    for name in ("reward_train", "reward_eval"):
        assert all(set(r) == {"prompt", "chosen", "rejected"} for r in splits[name])
    for name in ("ppo_train", "ppo_eval", "heldout_prompts"):
        assert all(set(r) == {"prompt", "label"} and r["label"] in (0, 1) for r in splits[name])
    prompts = [r["prompt"] for n in ("sft_train", "reward_train", "ppo_train") for r in splits[n]]
    assert all(p.startswith(SMALL.instruction + " ") and len(p.split()) == 3 + SMALL.prompt_words for p in prompts)


def test_html_line_breaks_are_stripped(splits):
    assert movie_reviews.clean("Great.<br /><br />Really   great.<br/>Yes<br>") == "Great. Really great. Yes"
    for rows in splits.values():
        for row in rows:
            for value in row.values():
                assert "<br" not in str(value)


def source_keys(splits) -> dict[str, set[tuple[str, str]]]:
    """Each split's rows as the (prompt, continuation) of the reviews they were cut from."""
    keys = {
        name: {opening(r["text"]) for r in splits[name]} for name in ("pretrain_train", "pretrain_eval")
    }
    for name in ("sft_train", "sft_eval"):
        keys[name] = {(r["prompt"], r["completion"]) for r in splits[name]}
    return keys


def test_splits_are_disjoint(splits, reviews):
    texts = {name: {r["text"] for r in splits[name]} for name in ("pretrain_train", "pretrain_eval")}
    assert not texts["pretrain_train"] & texts["pretrain_eval"]
    pretrain_keys = {opening(t) for name in texts for t in texts[name]}

    # A review opening may be used as often as the data holds reviews that start with it: two
    # reviews can share their first words, one review must never feed two splits.
    prompt_splits = ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval")
    available = Counter(opening(r.text)[0] for r in reviews)
    used = Counter(key[0] for key in pretrain_keys)
    for name in prompt_splits:
        used.update(r["prompt"] for r in splits[name])
    assert {p: (n, available[p]) for p, n in used.items() if n > available[p]} == {}

    sft = {(r["prompt"], r["completion"]) for n in ("sft_train", "sft_eval") for r in splits[n]}
    assert not sft & pretrain_keys
    train_prompts = {r["prompt"] for r in splits["sft_train"]}
    assert not train_prompts & {r["prompt"] for r in splits["sft_eval"]}
    continuations = {c for _, c in sft}
    responses = {r[k] for n in ("reward_train", "reward_eval") for r in splits[n] for k in ("chosen", "rejected")}
    assert not continuations & responses
    assert not (continuations | responses) & {c for _, c in pretrain_keys}


def test_heldout_prompts_open_the_pretrain_eval_reviews(splits, reviews):
    """A second evaluation set: the openings of the reviews held out from pretraining, which no stage
    trains on, in their order, long enough to be prompts."""
    held_out = [r["text"] for r in splits["pretrain_eval"] if len(r["text"].split()) >= SMALL.min_words]
    assert held_out and [r["prompt"] for r in splits["heldout_prompts"]] == [opening(t)[0] for t in held_out]
    label_of = {r.text: r.label for r in reviews}
    assert [r["label"] for r in splits["heldout_prompts"]] == [label_of[t] for t in held_out]


def test_reward_pairs_follow_human_labels_and_are_balanced(splits, reviews):
    label_of = {opening(r.text): r.label for r in reviews}
    labels_by_continuation: dict[str, set[int]] = {}
    for r in reviews:
        labels_by_continuation.setdefault(opening(r.text)[1], set()).add(r.label)

    for name in ("reward_train", "reward_eval"):
        from_chosen = from_rejected = 0
        for row in splits[name]:
            assert labels_by_continuation[row["chosen"]] == {1}, row
            assert labels_by_continuation[row["rejected"]] == {0}, row
            chosen_key, rejected_key = (row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])
            assert (chosen_key in label_of) != (rejected_key in label_of), "prompt must open exactly one of the pair"
            if chosen_key in label_of:
                assert label_of[chosen_key] == 1
                from_chosen += 1
            else:
                assert label_of[rejected_key] == 0
                from_rejected += 1
        assert from_chosen == from_rejected == len(splits[name]) // 2, name


def test_sft_and_ppo_rows_come_from_their_own_reviews(splits, reviews):
    label_of = {opening(r.text): r.label for r in reviews}
    prompt_labels: dict[str, set[int]] = {}
    for key, label in label_of.items():
        prompt_labels.setdefault(key[0], set()).add(label)
    for name in ("sft_train", "sft_eval"):
        assert all((r["prompt"], r["completion"]) in label_of for r in splits[name])
    for name in ("ppo_train", "ppo_eval"):
        rows = splits[name]
        assert all(r["label"] in prompt_labels[r["prompt"]] for r in rows)
        assert sum(r["label"] for r in rows) == len(rows) // 2  # balanced positive/negative


def test_pretrain_holds_all_unused_reviews(splits, reviews):
    used = sum(len(splits[n]) for n in ("sft_train", "sft_eval", "ppo_train", "ppo_eval"))
    used += 2 * sum(len(splits[n]) for n in ("reward_train", "reward_eval"))
    pretrain = len(splits["pretrain_train"]) + len(splits["pretrain_eval"])
    assert pretrain + used == len(reviews)


def test_prepare_writes_jsonl_once_per_recipe(tmp_path, monkeypatch, splits):
    splits = {name: rows[:50] for name, rows in splits.items()}
    calls = []
    monkeypatch.setattr(movie_reviews, "build_splits", lambda cfg: calls.append(cfg) or splits)
    out = tmp_path / "movie-reviews"
    movie_reviews.prepare(SMALL, out)
    for name in movie_reviews.SPLITS:
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert rows == splits[name]
    movie_reviews.prepare(SMALL, out)
    assert calls == [SMALL]  # same recipe: nothing rebuilt
    (out / "ppo_eval.jsonl").unlink()
    movie_reviews.prepare(SMALL, out)
    assert len(calls) == 2 and (out / "ppo_eval.jsonl").exists()  # a missing split is rebuilt
    other = MovieReviewsSection(**{**SMALL.__dict__, "seed": 5})
    movie_reviews.prepare(other, out)
    assert calls[-1] == other  # a new recipe rebuilds


def test_reward_words_lengthen_the_pair_responses_only(reviews, monkeypatch):
    """Preference responses may run longer than the SFT completions: the same continuation, further on."""
    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))
    longer = MovieReviewsSection(**{**SMALL.__dict__, "reward_words": 40, "min_words": 50})
    splits = movie_reviews.build_splits(longer)
    label_of = {opening(r.text, longer): r.label for r in reviews}
    long_label_of = {}
    for r in reviews:
        words = r.text.split()
        long_label_of[" ".join(words[longer.prompt_words:longer.prompt_words + 40])] = r.label
    for name in ("reward_train", "reward_eval"):
        for row in splits[name]:
            assert len(row["chosen"].split()) == len(row["rejected"].split()) == 40  # min_words keeps them whole
            assert long_label_of[row["chosen"]] == 1 and long_label_of[row["rejected"]] == 0
    for name in ("sft_train", "sft_eval"):
        assert all((r["prompt"], r["completion"]) in label_of and len(r["completion"].split()) == 20
                   for r in splits[name])


def test_splits_larger_than_the_data_name_the_key(reviews, monkeypatch):
    from pipeline.errors import ConfigError

    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))
    with pytest.raises(ConfigError, match=r"^movie_reviews\.reward_pairs: asks for 50000 reviews .* only \d+ are left"):
        movie_reviews.build_splits(MovieReviewsSection(**{**SMALL.__dict__, "reward_pairs": 50000}))


def test_reward_windows_add_later_stretches_of_the_same_training_reviews(splits, reviews, monkeypatch):
    monkeypatch.setattr(movie_reviews, "load_reviews", lambda: list(reviews))  # skip re-reading the CSV
    two = movie_reviews.build_splits(MovieReviewsSection(**{**SMALL.__dict__, "reward_windows": 2}))
    first, later = two["reward_train"][:40], two["reward_train"][40:]
    assert first == splits["reward_train"]  # the first stretch of each pair is unchanged
    assert two["reward_eval"] == splits["reward_eval"]  # held-out pairs: first stretches only
    assert 0 < len(later) <= 40
    texts = {r.text for r in reviews}
    first_by_prompt = {r["prompt"]: r for r in first}
    for row in later:
        # the words right after the first stretch, in the same positive (chosen) and negative (rejected) reviews
        base = first_by_prompt[row["prompt"]]
        for key in ("chosen", "rejected"):
            assert len(row[key].split()) >= SMALL.continuation_words // 2
            assert any(f"{base[key]} {row[key]}" in t for t in texts), (key, row)
    assert not {r["chosen"] for r in later} & {r["chosen"] for r in first}
