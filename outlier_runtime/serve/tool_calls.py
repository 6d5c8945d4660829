"""Tool calling as mlx_lm.server does it: the chat template renders ``tools``, and the model's
tool calls (text between the tokenizer's tool-call markers) are parsed back into OpenAI
``tool_calls``.

mlx-lm's tokenizer wrapper says whether a model can call tools (``has_tool_calling``: its
template names a tool-call format mlx-lm knows), which markers delimit a call, and which of
its ``tool_parsers`` reads one. A request with ``tools`` for a model without them is refused
(400) rather than silently rendered without them. A :class:`ToolCallSplitter` follows the
reply as it streams: text outside the markers is content, a call is held until its end
marker and then parsed; a marker split across tokens is held back until it is decided.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from outlier_runtime.serve.openai_api import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolFormat:
    """How one model writes a tool call: its markers and mlx-lm's parser for the text between."""

    start: str
    end: str
    parse: Callable[[str, Any], Any]


def tool_format(tokenizer: Any) -> ToolFormat | None:
    """The tokenizer's tool-call format, or None when its template has none mlx-lm knows."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser)


def check_tools(tier: str, tokenizer: Any) -> ToolFormat:
    """The tier's tool-call format, or a 400 saying why this model cannot take ``tools``."""
    found = tool_format(tokenizer)
    if found is None:
        reason = ("its chat template does not render tools in a tool-call format mlx-lm knows"
                  if getattr(tokenizer, "chat_template", None) else "it has no chat template")
        raise ApiError(400, f"Tier {tier!r} cannot call tools: {reason}. Send the request without `tools`, "
                            f"or use a model whose template supports tool calling.",
                       param="tools", code="tools_not_supported")
    return found


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallSplitter:
    """Splits a reply, fed piece by piece, into content text and OpenAI tool calls."""

    def __init__(self, form: ToolFormat, tools: list[dict[str, Any]] | None):
        self._form = form
        self._tools = tools
        self._pending = ""  # text not decided yet: a possible marker start, or a call in progress
        self._in_call = False
        self.calls_made = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Content that can be shown now, and the calls completed by this piece."""
        self._pending += text
        content, calls = "", []
        while True:
            marker = self._form.end if self._in_call else self._form.start
            at = self._pending.find(marker)
            if at < 0:
                if not self._in_call:
                    keep = _partial_suffix(self._pending, marker)
                    content += self._pending[:len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                return content, calls
            if self._in_call:
                body = self._pending[:at]
                parsed = self._parse(body, closed=True)
                if parsed is None:  # kept as content rather than dropped: the client sees what was written
                    content += self._form.start + body + self._form.end
                else:
                    calls += parsed
            else:
                content += self._pending[:at]
            self._pending = self._pending[at + len(marker):]
            self._in_call = not self._in_call

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the reply: held text, and a call cut off before its end marker (parsed
        if it parses, else returned as the text it was)."""
        pending, self._pending = self._pending, ""
        if not self._in_call:
            return pending, []
        self._in_call = False
        calls = self._parse(pending, closed=False)
        return ("", calls) if calls is not None else (self._form.start + pending, [])

    def _parse(self, text: str, closed: bool) -> list[dict[str, Any]] | None:
        """The calls in one call's text, or None if it does not parse."""
        try:
            parsed = self._form.parse(text, self._tools)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            log.warning("a tool call did not parse (%s: %s)%s", type(exc).__name__, exc,
                        "" if closed else "; it was cut off by the token limit")
            return None
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                continue
            arguments = call.get("arguments", {})
            calls.append({"id": call.get("id") or _call_id(), "type": "function",
                          "function": {"name": call["name"],
                                       "arguments": arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)}})
        self.calls_made += len(calls)
        return calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper start of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
