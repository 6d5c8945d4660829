"""Generation parameters: one set of checks for every entry (Python API, CLI flags, server).

The bounds are the manifest's ``[generation]`` bounds (a test keeps them equal), so a value
refused in TOML is refused as a keyword, a flag or a request field too; those three get the same
one-line message, which names the parameter and its flag.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from outlier_runtime.core.errors import ParameterError
from outlier_runtime.core.images import MAX_IMAGES

#: mx.random.seed takes an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1

#: Each parameter's CLI flag, so a message can name what the user typed.
FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temp", "top_p": "--top-p", "seed": "--seed",
         "top_k": "--top-k", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
         "images": "--image"}

#: Sampling parameters beyond temperature and top_p (the server's request fields of the same names).
SAMPLING_EXTRAS = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


class GenerationParams(BaseModel):
    """What one generation call may set; ``None`` keeps the tier's default."""

    model_config = ConfigDict(extra="forbid")

    #: Text, chat messages, or token ids; None checks the other parameters alone.
    prompt: Union[str, list[int], list[dict[str, Any]], None] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    # Sampling extras, as mlx-lm's make_sampler / make_logits_processors take them; 0 turns each off.
    #: Sample among the k most likely tokens only.
    top_k: Optional[int] = Field(default=None, ge=0)
    #: Drop tokens less likely than min_p times the most likely one.
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    #: Divide (multiply, when negative) the logits of tokens seen in the last 20 by this.
    repetition_penalty: Optional[float] = Field(default=None, ge=0)
    #: Subtract this from the logits of tokens seen in the last 20 (OpenAI's range).
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    #: Subtract this times the count of each token seen in the last 20 (OpenAI's range).
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    #: Report each generated token's log probability and this many likely alternatives (OpenAI's bound).
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    #: Images for a vision tier (paths, bytes, PIL images, data: URLs); decoded by core/images.py.
    images: Optional[list[Any]] = None

    @field_validator("images")
    @classmethod
    def _few_images(cls, images: Any) -> Any:
        if images is not None and len(images) > MAX_IMAGES:
            raise ValueError(f"{len(images)} images, more than {MAX_IMAGES} per call; send fewer")
        return images

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if prompt is not None and not prompt:
            raise ValueError("empty; give some text (or chat messages) to continue or answer")
        return prompt


def check_generation(prompt: Union[str, Sequence[Any], None] = None, **options: Any) -> GenerationParams:
    """Validate one call's parameters, raising a one-line ParameterError naming the first bad one."""
    if prompt is not None and not isinstance(prompt, str):
        prompt = [item if isinstance(item, int) else dict(item) for item in prompt]
    try:
        return GenerationParams(prompt=prompt, **options)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        raise ParameterError(explain(exc), param=str(first[0]) if first else None) from None


def explain(exc: ValidationError) -> str:
    """The first problem of a validation error as one line: which parameter, what it got, what it needs."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else "(parameters)"
    ctx = error.get("ctx") or {}
    bounds = {
        "greater_than_equal": f"expected a number >= {ctx.get('ge')}",
        "greater_than": f"expected a number > {ctx.get('gt')}",
        "less_than_equal": f"expected a number <= {ctx.get('le')}",
        "less_than": f"expected a number < {ctx.get('lt')}",
    }
    if error["type"] == "extra_forbidden":
        what = f"unknown parameter; use one of {', '.join(sorted(GenerationParams.model_fields))}"
    elif error["type"] in bounds:
        what = f"got {error.get('input')!r}, {bounds[error['type']]}"
    elif error["type"] == "value_error":
        what = str(ctx.get("error", error["msg"]))
    else:
        what = f"got {error.get('input')!r}: {error['msg']}"
    flag = f" ({FLAGS[name]})" if name in FLAGS else ""
    return f"{name}{flag}: {what}."


def token_budget(prompt_tokens: int, requested: int | None, default: int, context_window: int) -> int:
    """Tokens to generate: ``requested`` (or ``default``, shortened to fit) within the context window."""
    room = context_window - prompt_tokens
    if room <= 0:
        raise ParameterError(
            f"prompt: {prompt_tokens} tokens leave no room in the context window of {context_window} "
            f"tokens; shorten the prompt (or raise `generation.context_window`).", param="prompt"
        )
    if requested is None:
        return min(default, room)
    if requested > room:
        raise ParameterError(
            f"max_tokens (--max-tokens): {requested} plus the prompt's {prompt_tokens} tokens exceeds the "
            f"context window of {context_window} tokens; ask for at most {room} or shorten the prompt.",
            param="max_tokens",
        )
    return requested
