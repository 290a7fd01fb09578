"""Chat turns through a tokenizer's own chat template: prompts for generation, conversations for SFT.

Whatever the model family (ChatML, Llama-3 headers, our demo's role tokens), the template that
ships with the tokenizer renders the turns; nothing here knows a family's markup. The loss mask
of a conversation is found by rendering growing prefixes of it: the characters an assistant turn
adds, its end-of-turn marker included, are the ones SFT learns to write.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from pipeline.errors import DataError
from pipeline.schemas import Prompt, Turn, prompt_turns


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text a model is given to answer `prompt`: the chat template's turns and generation prompt,
    or the string itself for a tokenizer without a chat template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(prompt_turns(prompt), tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise DataError(f"prompts are chat turns, but the tokenizer ({tokenizer.name_or_path}) has no chat template; "
                        "give it one (tokenizer.chat_template) or use string prompts")
    return prompt


def assistant_spans(tokenizer, turns: list[Turn]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span [start, end) of every assistant turn in it.

    A turn's span runs from the end of the earlier turns' rendering with the generation prompt to the end
    of the rendering that includes it. A template that renders earlier turns differently once later ones
    follow (e.g. one that strips reasoning from past turns) gives no span for those turns.
    """
    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    text = render(len(turns), False)
    spans = []
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant" or k == 0:
            continue
        before, through = render(k, True), render(k + 1, False)
        if text.startswith(before) and text.startswith(through) and len(through) > len(before):
            spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(tokenizer, turns: list[Turn]) -> dict[str, list[int]] | None:
    """`input_ids` of the rendered conversation and `assistant_masks` (1 on assistant tokens, 0 elsewhere);
    None when no assistant turn could be located."""
    text, spans = assistant_spans(tokenizer, turns)
    if not spans:
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= first < end for start, end in spans)) for first, _ in encoded["offset_mapping"]]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


@contextlib.contextmanager
def template_errors_named(tokenizer, source: str, row: int, field: str) -> Iterator[None]:
    """A chat template that refuses a row's turns (Gemma's "System role not supported", Llama-2's and Mistral's
    "roles must alternate") is one line naming the row, not a jinja2 traceback from inside the trainer."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as err:
        raise DataError(f"{source}: row {row}: the chat template of {tokenizer.name_or_path} refuses the turns "
                        f"of field '{field}': {err}") from None


def check_template_renders(tokenizer, conversations: Iterable[list[Turn]], source: str, field: str) -> None:
    """Render every row's turns once, for rows the trainer renders itself (TRL's prompt/completion and pairs)."""
    for i, turns in enumerate(conversations):
        with template_errors_named(tokenizer, source, i + 1, field):
            tokenizer.apply_chat_template(turns, tokenize=False)
