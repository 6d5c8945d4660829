"""The OpenAI wire format the server speaks: request models, error bodies and replies.

Requests are checked strictly. A field this server cannot honour (``n > 1``,
``tool_choice="required"``, ...) is answered with HTTP 400 naming it, never ignored; an unknown
field is rejected too. The few extras that OpenAI clients send and that change nothing about
the text (``user``, ``metadata``, ``store``, ...) are declared below and ignored on purpose. The
sampling extras chat front ends send (``top_k``, ``min_p``, the penalties), ``logprobs`` and
``tools`` (for templates that support them: serve/tool_calls.py) are honoured.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Sequence, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from outlier_runtime.core.params import SAMPLING_EXTRAS
from outlier_runtime.core.results import GenerationResult

#: Served tiers are named ``outlier-<tier>`` in ``/v1/models`` and the ``model`` field.
MODEL_PREFIX = "outlier-"

# Request limits, checked while parsing (before anything is tokenized); each refusal is a 400
# naming the field and the limit. The body itself is bounded by the server (serve/guard.py).
MAX_MESSAGES = 1024
#: Characters per message content (or prompt); the context-window check comes later, on tokens.
MAX_CONTENT_CHARS = 1_000_000
MAX_STOPS = 16
#: Characters of one image_url (a data: URL); the request body bound (serve/guard.py) is lower.
MAX_IMAGE_URL_CHARS = 32 * 2**20
MAX_STOP_CHARS = 256
#: ``seed`` is an unsigned 64-bit integer (what mlx's generator takes).
MAX_SEED = 2**64 - 1
#: Tool definitions per request (OpenAI's limit), and their size as JSON in characters.
MAX_TOOLS = 128
MAX_TOOLS_CHARS = 262_144
#: Nesting of a tool's JSON schema (or a call's arguments): the template renders it recursively.
MAX_JSON_DEPTH = 32
#: Tool calls per assistant message.
MAX_TOOL_CALLS = 128
#: OpenAI's bounds: chat ``top_logprobs`` 0..20, legacy completions ``logprobs`` 0..5.
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5

_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(text: str) -> str:
    # JSON may escape half of a UTF-16 pair ("\ud800"): no tokenizer can encode that text.
    match = _SURROGATE.search(text)
    if match:
        raise ValueError(f"text contains a lone UTF-16 surrogate (U+{ord(match.group()):04X}) at character "
                         f"{match.start()}; send valid Unicode")
    return text


#: Text the server passes on: valid Unicode.
Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
Content = Annotated[str, Field(max_length=MAX_CONTENT_CHARS), AfterValidator(_no_lone_surrogates)]


def _bounded_stops(stop: Union[str, list[str], None]) -> Union[str, list[str], None]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, not {len(stops)}")
    for text in stops:
        if len(text) > MAX_STOP_CHARS:
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters, not {len(text)}")
        _no_lone_surrogates(text)
    return stop


def _bounded_prompt(prompt: Union[str, list[str]]) -> Union[str, list[str]]:
    for text in [prompt] if isinstance(prompt, str) else prompt[:1]:  # more than one is refused later
        if len(text) > MAX_CONTENT_CHARS:
            raise ValueError(f"the prompt may have at most {MAX_CONTENT_CHARS} characters, not {len(text)}")
        _no_lone_surrogates(text)
    return prompt


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError | Any) -> ApiError:
    """A 400 for the first problem pydantic (or FastAPI's body parsing) found."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "Invalid request body.")
    error = errors[0]
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", _STRING_CONTENT, _PARTS_CONTENT)]
    param = ".".join(location) or None
    if error.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if error.get("type") == "json_invalid":
        return ApiError(400, "The request body is not valid JSON.")
    where = f"`{param}`: " if param else ""
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"Invalid request: {where}{message}", param=param, code="invalid_value")


def _unset(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == {} or value == []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (iterative: a deep value must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _shallow_json(value: Any) -> Any:
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


class FunctionDefinition(_Strict):
    """A tool the model may call: OpenAI's ``{"type": "function", "function": {...}}``."""

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: Optional[Text] = None
    parameters: Annotated[Optional[dict[str, Any]], AfterValidator(_shallow_json)] = None
    strict: Optional[bool] = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


def _bounded_tools(tools: Optional[list[ToolDefinition]]) -> Optional[list[ToolDefinition]]:
    if tools is None:
        return None
    size = sum(len(tool.model_dump_json(exclude_none=True)) for tool in tools)
    if size > MAX_TOOLS_CHARS:
        raise ValueError(f"the tool definitions may have at most {MAX_TOOLS_CHARS} characters of JSON, not {size}")
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise ValueError("two tools have the same name")
    return tools


class FunctionCall(_Strict):
    name: Text
    #: The arguments as a JSON string (as OpenAI sends them back).
    arguments: Content = "{}"


class MessageToolCall(_Strict):
    """A tool call in an earlier assistant message of the conversation."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall

    def to_template(self) -> dict[str, Any]:
        # Templates render the arguments as an object (mlx_lm.server parses them the same way).
        try:
            arguments: Any = _shallow_json(json.loads(self.function.arguments))
        except (ValueError, RecursionError):
            arguments = self.function.arguments  # not JSON: rendered as the text it is
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class StreamOptions(_Strict):
    include_usage: bool = False


class ImageUrl(_Strict):
    #: A ``data:`` URL (base64), or a local path when the server allows them; never fetched from a network.
    url: Annotated[str, Field(max_length=MAX_IMAGE_URL_CHARS)]
    #: OpenAI's resolution hint; the model's processor decides the resolution here.
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Content


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value  # some clients send the URL alone


def _content_kind(value: Any) -> str:
    return _STRING_CONTENT if isinstance(value, str) else _PARTS_CONTENT


# Tags of the two shapes of a message's content; left out of the field path an error names, so a
# too-long string is still `messages.0.content`.
_STRING_CONTENT, _PARTS_CONTENT = "<string>", "<parts>"
MessageContent = Annotated[
    Union[Annotated[Content, Tag(_STRING_CONTENT)],
          Annotated[list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]], Tag(_PARTS_CONTENT)]],
    Discriminator(_content_kind),
]


class ChatMessage(_Strict):
    """A chat message for the tokenizer's chat template: an assistant's may carry ``tool_calls``,
    and a ``tool`` message answers one (``tool_call_id``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    #: A string; a list of text parts (``{"type": "text", "text": ...}``), joined; or text and
    #: ``image_url`` parts (vision tiers), kept in order.
    content: MessageContent = ""
    #: Harmless: chat templates have no place for a participant name.
    name: Optional[Text] = None
    tool_calls: Optional[list[MessageToolCall]] = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: Optional[Text] = None
    # Fields of a reply's message that clients send back with it: accepted and ignored on purpose.
    refusal: Optional[Text] = None
    annotations: Optional[list[Any]] = Field(default=None, max_length=0)
    audio: None = None
    function_call: None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if content is None:
            return ""
        if not isinstance(content, list):
            return content
        if not all(isinstance(part, dict) and part.get("type") in ("text", "image_url") for part in content):
            raise ValueError('only text and image_url content parts ({"type": "text", "text": "..."}, '
                             '{"type": "image_url", "image_url": {"url": "data:..."}}) are supported; '
                             "audio and files are not")
        if all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            return "".join(part["text"] for part in content)
        return content

    def to_template(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system message.
        role = "system" if self.role == "developer" else self.role
        content = (self.content if isinstance(self.content, str)
                   else [part.model_dump(exclude_none=True) for part in self.content])
        message: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content
                                                         if isinstance(p, ImagePart)]


class _GenerationRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: Text
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stop: Annotated[Union[str, list[str], None], AfterValidator(_bounded_stops)] = None
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Sampling extras chat front ends send (mlx_lm.server takes them too); their bounds are
    # checked with every other generation parameter's, in core/params.py.
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    # Harmless extras OpenAI clients send: accepted and ignored on purpose.
    user: Optional[Text] = None
    # Declared so that asking for them gets a clear 400 (see UNSUPPORTED), not "unknown field".
    n: Any = None
    logit_bias: Any = None

    #: field -> (is the value one we can honour?, why not otherwise)
    UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        "n": (lambda v: v in (None, 1), "only n=1 is supported (one choice per request)"),
        "logit_bias": (_unset, "logit_bias is not supported"),
    }

    def check_supported(self) -> None:
        """Raise a 400 naming the first option this server cannot honour."""
        for name, (ok, why) in self.UNSUPPORTED.items():
            if not ok(getattr(self, name)):
                raise ApiError(400, f"Unsupported parameter `{name}`: {why}.", param=name,
                               code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "`stream_options` is only allowed when `stream` is true.",
                           param="stream_options", code="invalid_value")
        if any(not s for s in self.stops()):
            raise ApiError(400, "Stop sequences must not be empty.", param="stop", code="invalid_value")

    def sampling(self) -> dict[str, Any]:
        """The sampling extras this request sets, as ``Runtime.stream`` takes them."""
        return {name: getattr(self, name) for name in SAMPLING_EXTRAS if getattr(self, name) is not None}

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    #: The newer name of max_tokens; either may be given.
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    # Harmless extras: bookkeeping fields that do not change the generated text.
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    #: Every call the model writes is returned; a model writes one or several as it was trained.
    parallel_tool_calls: Optional[bool] = None
    tools: Annotated[Optional[list[ToolDefinition]], Field(max_length=MAX_TOOLS),
                     AfterValidator(_bounded_tools)] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    functions: Any = None
    function_call: Any = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    UNSUPPORTED = {
        **_GenerationRequest.UNSUPPORTED,
        "tool_choice": (lambda v: v in (None, "none", "auto"),
                        'only "auto" and "none": the model decides whether to call a tool, it cannot be forced'),
        "functions": (_unset, "the deprecated `functions` are not supported; send `tools`"),
        "function_call": (lambda v: v in (None, "none"), "the deprecated `function_call` is not supported; "
                                                         "send `tool_choice`"),
        "response_format": (lambda v: v is None or v == {"type": "text"}, "only plain text responses are supported"),
        "audio": (lambda v: v is None, "audio output is not supported"),
        "modalities": (lambda v: v in (None, ["text"]), "only text output is supported"),
        "prediction": (lambda v: v is None, "predicted outputs are not supported"),
        "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported"),
        "verbosity": (lambda v: v is None, "verbosity is not supported"),
        "web_search_options": (lambda v: v is None, "web search is not supported"),
    }

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "`top_logprobs` needs `logprobs` set to true.", param="top_logprobs",
                           code="invalid_value")
        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            raise ApiError(400, "Give `max_tokens` or `max_completion_tokens`, not two different values.",
                           param="max_completion_tokens", code="invalid_value")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per token to report (0: the chosen token's only), or None: no log probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_definitions(self) -> list[dict[str, Any]] | None:
        """The tools for the chat template, or None (none sent, or ``tool_choice`` is "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` (raw text, no chat template)."""

    prompt: Annotated[Union[str, list[str]], AfterValidator(_bounded_prompt)]
    best_of: Any = None
    echo: Any = None
    #: The legacy form: report this many alternatives per token (0: the chosen token's only).
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    suffix: Any = None

    UNSUPPORTED = {
        **_GenerationRequest.UNSUPPORTED,
        "prompt": (lambda v: isinstance(v, str) or len(v) == 1, "send one prompt per request"),
        "best_of": (lambda v: v in (None, 1), "only best_of=1 is supported"),
        "echo": (_unset, "echo is not supported"),
        "suffix": (lambda v: v is None, "suffix (insertion) is not supported"),
    }

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_budget(self) -> int | None:
        return self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


def usage(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generation_tokens,
        "total_tokens": result.prompt_tokens + result.generation_tokens,
        # Where OpenAI clients look for prompt-cache hits: the prompt tokens not prefilled again.
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


@dataclass
class Reply:
    """Builds the response objects (whole, or stream chunks) of one chat or text completion.

    With ``logprobs`` the choices carry each token's log probability (chat: ``logprobs.content``;
    text: the legacy ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``). When the
    worker found the model's tool-call format, ``tool_calls`` (a :class:`ToolCallSplitter`) moves
    the calls out of the content into ``tool_calls``, and the finish reason becomes "tool_calls".
    """

    chat: bool
    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    logprobs: bool = False
    tool_calls: Any = None
    _offset: int = 0  # characters of text sent so far (the legacy text_offset)

    def _envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        body = {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}
        if stream and self.include_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries usage
        return body

    def _logprobs(self, entries: Sequence[Any]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [_chat_logprob(entry) for entry in entries], "refusal": None}
        offsets, at = [], self._offset
        for entry in entries:
            offsets.append(at)
            at += len(entry.text)
        self._offset = at  # by the tokens' own texts, so streamed offsets equal the whole reply's
        return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{alt.text: alt.logprob for alt in e.top} for e in entries],
                "text_offset": offsets}

    def _choice(self, text: str | None, finish_reason: str | None, *, first: bool = False, stream: bool = True,
                calls: Sequence[dict[str, Any]] = (), entries: Sequence[Any] = ()) -> dict[str, Any]:
        logprobs = self._logprobs(entries) if (entries or not stream) else None
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                message["tool_calls"] = list(calls)
            return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = list(calls)
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _split(self, text: str, *, last: bool) -> tuple[str, list[dict[str, Any]]]:
        """The content and the (stream-indexed) tool calls in the next piece of text."""
        if self.tool_calls is None:
            return text, []
        done = self.tool_calls.calls_made
        content, calls = self.tool_calls.feed(text)
        if last:
            tail, more = self.tool_calls.finish()
            content, calls = content + tail, calls + more
        return content, [{"index": done + i, **call} for i, call in enumerate(calls)]

    def _finish_reason(self, result: GenerationResult) -> str:
        reason = finish_reason(result)
        made_calls = self.tool_calls is not None and self.tool_calls.calls_made > 0
        return "tool_calls" if made_calls and reason == "stop" else reason

    def opening(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role; text completions have no opening chunk."""
        return self._envelope([self._choice(None, None, first=True)], True) if self.chat else None

    def piece(self, chunk: Any) -> dict[str, Any] | None:
        """The stream chunk for a generated :class:`Chunk`; None while a tool call is being written
        and there is nothing to send yet."""
        text, calls = self._split(chunk.text, last=False)
        if not (text or calls or (self.logprobs and chunk.logprobs)):
            return None
        return self._envelope([self._choice(text, None, calls=calls, entries=chunk.logprobs)], True)

    def closing(self, result: GenerationResult) -> dict[str, Any]:
        text, calls = self._split("", last=True)
        return self._envelope([self._choice(text, self._finish_reason(result), calls=calls)], True)

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return {**self._envelope([], True), "usage": usage(result)}

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        text, calls = self._split(result.text, last=True)
        calls = [{k: v for k, v in call.items() if k != "index"} for call in calls]
        choice = self._choice(text, self._finish_reason(result), stream=False, calls=calls,
                              entries=result.logprobs or [])
        return {**self._envelope([choice], False), "usage": usage(result)}


def _chat_logprob(entry: Any) -> dict[str, Any]:
    return {"token": entry.text, "logprob": entry.logprob, "bytes": entry.bytes,
            "top_logprobs": [{"token": alt.text, "logprob": alt.logprob, "bytes": alt.bytes} for alt in entry.top]}


def finish_reason(result: GenerationResult) -> str:
    # mlx-lm says "length" at the token budget and "stop" at end-of-sequence or a stop string.
    return result.finish_reason or "stop"
