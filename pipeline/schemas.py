"""The dataset shapes each stage accepts, recognised from a row's fields and checked row by row.

    stage    format             fields (after `data.columns` renames)
    sft      messages           `messages`: a conversation; the loss is on every assistant turn
             prompt_completion  `prompt` + `completion`: strings, or lists of {role, content}
             text               `text`: plain text; the loss is on every token
    reward   preference         `chosen` + `rejected` (+ `prompt`): strings, or assistant turns
             conversations      `chosen` + `rejected` as whole conversations sharing their first
                                turns (ultrafeedback_binarized); a `prompt` column beside them is ignored
             hh                 `chosen` + `rejected` as Anthropic HH text, "\\n\\nHuman: ... \\n\\nAssistant: ..."
    ppo/eval prompt             `prompt`: a string (one user turn) or a list of turns (system turns kept)
             messages           `messages` ending in a user turn (a trailing assistant turn is dropped:
                                the prompt is what it answered)

`data.format: auto` recognises the shape from the columns; naming one checks every row against it.
Every row is checked before training, and the first one that fits no shape stops the stage with
its file, row number and field. Prompts travel as a string or a list of turns (`Prompt`).
"""

from __future__ import annotations

import re
from typing import Any, Union

from pipeline.errors import DataError

Turn = dict[str, str]
Prompt = Union[str, list[Turn]]

FORMATS = {
    "pretrain": ("text",),
    "sft": ("messages", "prompt_completion", "text"),
    "reward": ("preference", "conversations", "hh"),
    "ppo": ("prompt", "messages"),
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class RowProblem(ValueError):
    """Why one row does not fit its format: the field and the reason (the caller adds file and row)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field '{field}' {reason}")


# ---- values --------------------------------------------------------------------------------------------------

def check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowProblem(field, "is missing")
    if not isinstance(value, str):
        raise RowProblem(field, f"must be a string or a list of turns, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(field, "is an empty string")
    return value


def check_turns(value: Any, field: str) -> list[Turn]:
    """A non-empty list of {role, content} dicts with string content, returned as plain role/content dicts."""
    if not isinstance(value, list) or not value:
        raise RowProblem(field, "must be a non-empty list of {role, content} turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not turn.get("role") or not isinstance(turn.get("content"), str):
            raise RowProblem(field, f"turn {i + 1} has no role/content")
        turns.append({"role": str(turn["role"]), "content": turn["content"]})
    return turns


def is_turns(value: Any) -> bool:
    return isinstance(value, list)


def prompt_text(prompt: Prompt) -> str:
    """What a person reads as the prompt: the string, or the last user turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [t["content"] for t in prompt if t["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def answer_text(value: Any) -> str:
    """The answers in a field as plain text: a string as is, the assistant turns of a conversation joined by
    spaces (text a person wrote or approved, for the fluency guard's model of the domain)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(t["content"] for t in value if isinstance(t, dict) and t.get("role") == "assistant"
                        and isinstance(t.get("content"), str))
    return ""


def prompt_turns(prompt: Prompt) -> list[Turn]:
    """A prompt as chat turns: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def parse_hh(text: str, field: str) -> list[Turn]:
    """Anthropic HH text -> turns. "\\n\\nHuman: hi\\n\\nAssistant: hello" -> [user: hi, assistant: hello]."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowProblem(field, "is not Anthropic HH text (\"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    turns = [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] != "assistant":
        raise RowProblem(field, "must end with an \"Assistant:\" turn")
    return turns


# ---- recognising a shape -------------------------------------------------------------------------------------

def detect(stage: str, first_row: dict[str, Any]) -> str | None:
    """The format of a stage's rows from the first row's fields, or None when nothing fits."""
    has = set(first_row)
    if stage == "pretrain":
        return "text" if "text" in has else None
    # A partial match (e.g. `prompt` without `completion`) picks its format, so the error names the missing field.
    if stage == "sft":
        if "messages" in has:
            return "messages"
        if "prompt" in has or "completion" in has:
            return "prompt_completion"
        return "text" if "text" in has else None
    if stage == "reward":
        if not {"chosen", "rejected"} & has:
            return None
        chosen = first_row.get("chosen")
        if is_turns(chosen) and any(isinstance(t, dict) and t.get("role") != "assistant" for t in chosen):
            return "conversations"
        if isinstance(chosen, str) and "prompt" not in has and HH_TURN.match(chosen):
            return "hh"
        return "preference"
    if stage == "ppo":
        if "prompt" in has:
            return "prompt"
        return "messages" if "messages" in has else None
    raise ValueError(stage)


EXPECTED = {
    "pretrain": "`text`",
    "sft": "`messages`, `prompt` + `completion`, or `text`",
    "reward": "`chosen` + `rejected` (with an optional `prompt`)",
    "ppo": "`prompt` or `messages`",
}


def columns_of(stage: str, fmt: str, first_row: dict[str, Any]) -> list[str]:
    """The columns a stage keeps for a format (the others are dropped)."""
    if fmt == "prompt_completion":
        return ["prompt", "completion"]
    if fmt == "preference":
        return ["prompt", "chosen", "rejected"] if "prompt" in first_row else ["chosen", "rejected"]
    if fmt in ("conversations", "hh"):
        return ["chosen", "rejected"]
    if fmt == "messages":
        return ["messages"]
    return [fmt]  # text, prompt


# ---- one row in, the stage's form out ------------------------------------------------------------------------

def sft_row(fmt: str, row: dict[str, Any]) -> dict[str, Any]:
    if fmt == "text":
        return {"text": check_text(row.get("text"), "text")}
    if fmt == "messages":
        turns = check_turns(row.get("messages"), "messages")
        if not any(t["role"] == "assistant" for t in turns):
            raise RowProblem("messages", "has no assistant turn (the assistant turns are what SFT learns to write)")
        return {"messages": turns}
    out = {}
    for field in ("prompt", "completion"):
        value = row.get(field)
        out[field] = check_turns(value, field) if is_turns(value) else check_text(value, field)
    if is_turns(out["completion"]) != is_turns(out["prompt"]):
        raise RowProblem("completion", "must be a list of turns when `prompt` is one (and a string when it is a string)")
    return out


def reward_row(fmt: str, row: dict[str, Any]) -> dict[str, Any]:
    if fmt == "hh":
        return {f: parse_hh(check_text(row.get(f), f), f) for f in ("chosen", "rejected")}
    if fmt == "conversations":
        out = {}
        for field in ("chosen", "rejected"):
            turns = check_turns(row.get(field), field)
            if turns[-1]["role"] != "assistant" or len(turns) < 2:
                raise RowProblem(field, "must be a conversation that ends with an assistant turn")
            out[field] = turns
        return out
    out = {}
    fields = ["prompt", "chosen", "rejected"] if "prompt" in row else ["chosen", "rejected"]
    for field in fields:
        value = row.get(field)
        out[field] = check_turns(value, field) if is_turns(value) else check_text(value, field)
    if len({is_turns(v) for v in out.values()}) > 1:
        raise RowProblem("chosen", "and the other fields must all be strings or all be lists of turns")
    return out


def prompt_row(fmt: str, row: dict[str, Any]) -> dict[str, Any]:
    """{"prompt": a string or turns ending in a user turn}."""
    if fmt == "messages":
        turns = check_turns(row.get("messages"), "messages")
        while turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns or turns[-1]["role"] != "user":
            raise RowProblem("messages", "has no user turn to answer")
        return {"prompt": turns}
    value = row.get("prompt")
    if not is_turns(value):
        return {"prompt": check_text(value, "prompt")}
    turns = check_turns(value, "prompt")
    if turns[-1]["role"] != "user":
        raise RowProblem("prompt", f"must end with a user turn (it ends with '{turns[-1]['role']}')")
    return {"prompt": turns}


ROW = {"pretrain": sft_row, "sft": sft_row, "reward": reward_row, "ppo": prompt_row}


def shape_name(value: Any) -> str:
    return "a list of turns" if is_turns(value) else "a string"


def check_same_shapes(row: dict[str, Any], first: dict[str, Any]) -> None:
    """Each field of a checked row is a string where row 1's is, and turns where row 1's are: the rows become one
    table, whose columns hold one type each."""
    for field, value in row.items():
        if field in first and is_turns(value) != is_turns(first[field]):
            raise RowProblem(field, f"is {shape_name(value)} but row 1's is {shape_name(first[field])}")


def normalise(stage: str, fmt: str, rows, where: str):
    """Every row checked and put in the stage's form; the first bad one raises DataError naming `where` and its row."""
    to_row = ROW[stage]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(to_row(fmt, row))
            check_same_shapes(out[-1], out[0])
        except RowProblem as problem:
            raise DataError(f"{where}: row {i + 1}: {problem} (format '{fmt}')") from None
    return out
