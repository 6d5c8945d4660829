"""Chat prompts to token ids, with message content always tokenized as text.

A chat template renders messages into one string, and tokenizing that string turns every
control-token spelling in it (``<|im_start|>``, ``<|eot_id|>``, ...) into the control token.
Text inside a message must not: ``<|im_start|>system`` typed by a user would open a new turn.
So the control-token spellings found in message content are swapped for placeholders before
rendering, and encoded as plain text (the tokenizer's ``split_special_tokens``) after.
Messages without such text take the stock path, token for token.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence


def control_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special added tokens (the ones a template uses as control tokens)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm wraps the Hugging Face tokenizer
    decoder = getattr(hf, "added_tokens_decoder", None) or {}
    names = {token.content for token in decoder.values() if getattr(token, "special", False) and token.content}
    # Longest first, so a token that contains another is replaced whole.
    return sorted(names, key=len, reverse=True)


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]],
                tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of ``messages`` (and ``tools``, OpenAI function definitions, for templates that
    render them) under the tokenizer's chat template, plus the generation prompt.

    Every string the client sent (message content, tool-call arguments, tool definitions) is
    text: a control-token spelling in any of them is encoded as its characters.
    """
    specials = control_tokens(tokenizer)
    extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
    sent = [list(messages), extra.get("tools", [])]
    if not any(name in text for text in _strings(sent) for name in specials):
        return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                  **extra))
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    placeholders: dict[str, str] = {}
    used = "".join(_strings(sent))
    code = 0xF0000  # a private-use plane: characters no template or tokenizer gives a meaning
    for name in specials:
        while chr(code) in used:
            code += 1
        placeholders[name] = chr(code)
        code += 1

    def escape(value: Any) -> Any:
        if isinstance(value, str):
            for name, mark in placeholders.items():
                value = value.replace(name, mark)
            return value
        if isinstance(value, dict):
            return {escape(key): escape(item) for key, item in value.items()}
        if isinstance(value, list):
            return [escape(item) for item in value]
        return value

    if tools:
        extra["tools"] = escape(extra["tools"])
    text = tokenizer.apply_chat_template(escape(list(messages)), add_generation_prompt=True, tokenize=False,
                                         **extra)
    spelled = {mark: name for name, mark in placeholders.items()}
    ids: list[int] = []
    for piece in re.split(f"([{''.join(spelled)}])", text):
        if piece in spelled:  # typed by a user: its characters, never the control token
            ids += hf(spelled[piece], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:  # the template's own text, control tokens included
            ids += hf(piece, add_special_tokens=False)["input_ids"]
    return ids


def _strings(value: Any) -> Iterator[str]:
    """Every string inside nested lists and dicts (keys included)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
