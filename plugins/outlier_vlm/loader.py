"""The ``vlm`` loader: ``mlx_vlm.load``, and generation through mlx-vlm's own loop.

mlx-lm cannot drive a vision-language model (its forward pass takes pixel values and
multimodal position ids), so the loaded model comes with a :class:`VLMGenerator`: the
runtime asks it to render prompts with the processor's chat template and to generate, and
keeps its own sampling, stop strings and result for both kinds of model.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

from outlier_runtime import CheckpointError, OutlierError, ParameterError
from outlier_runtime.core.protocols import LoadedModel, LoadRequest, PreparedPrompt
from outlier_runtime.core.memory import MemoryPlan
from outlier_runtime.engine.checkpoint import read_checkpoint

from outlier_vlm.memory import plan_vlm

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'outlier-runtime[vision]'"


def import_mlx_vlm() -> Any:
    """mlx_vlm, or one line naming the extra that installs it."""
    try:
        import mlx_vlm
        import mlx_vlm.generate  # noqa: F401 - fails here, not mid-request, if a dependency is broken
    except ImportError as exc:
        raise OutlierError(f"The vlm loader needs mlx-vlm, which is not installed ({exc}); "
                           f"install it with: {INSTALL_HINT}") from None
    return mlx_vlm


class VLMLoader:
    """Loads a vision-language model with ``mlx_vlm.load``; its tier takes images."""

    def plan_memory(self, request: LoadRequest) -> MemoryPlan:
        """Vision tower + language model weights (from the headers) + KV cache."""
        return plan_vlm(request.model_path, request.manifest.generation.context_window)

    def load(self, request: LoadRequest) -> LoadedModel:
        mlx_vlm = import_mlx_vlm()
        path = request.model_path
        read_checkpoint(path)  # a missing or truncated shard is named here, not deep inside mlx
        try:
            model, processor = mlx_vlm.load(str(path), lazy=request.options.lazy_load)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise CheckpointError(f"{path}: mlx-vlm cannot load this model ({exc}); is it an mlx-vlm "
                                  f"vision-language checkpoint?", str(path)) from None
        generator = VLMGenerator(mlx_vlm, model, processor, request.options.prefill_step_size)
        return LoadedModel(model=model, tokenizer=processor.tokenizer, vision=generator)


class VLMGenerator:
    """Prompts with images, and generation, through mlx-vlm (see the protocol ``VisionModel``)."""

    def __init__(self, mlx_vlm: Any, model: Any, processor: Any, prefill_step_size: int | None):
        self._mlx_vlm = mlx_vlm
        self.model = model
        self.processor = processor
        self.prefill_step_size = prefill_step_size
        tokenizer = processor.tokenizer
        # mlx-vlm tokenizes the rendered prompt whole, so control-token spellings in message
        # text act as control tokens (text tiers encode them as plain text instead): an image
        # placeholder would take an image's slot, a chat-template token (<|im_start|>) would
        # open a turn. Such text is refused where it can come from a user.
        placeholders = (getattr(processor, "image_token", None), getattr(processor, "video_token", None))
        self._placeholders = [t for t in placeholders if isinstance(t, str) and t]
        self._control = sorted(_special_tokens(tokenizer) | set(self._placeholders), key=len, reverse=True)
        self._eos = model.config.eos_token_id
        self._tokenizer = tokenizer

    def prepare(self, prompt: Any, images: Sequence[Any], chat: bool) -> PreparedPrompt:
        from mlx_vlm import apply_chat_template
        from mlx_vlm.utils import prepare_inputs

        if chat:
            self._check_text(prompt, bool(images))
            text = apply_chat_template(self.processor, self.model.config, list(prompt), num_images=len(images))
        else:
            text = prompt
        try:
            inputs = prepare_inputs(self.processor, images=list(images) or None, prompts=text,
                                    image_token_index=getattr(self.model.config, "image_token_index", None))
        except (ValueError, OSError) as exc:  # the processor refused an image (too small, odd shape)
            raise ParameterError(f"images: the model's processor cannot use the image(s): {exc}.",
                                 param="images") from None
        input_ids = inputs["input_ids"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        extra["mask"] = inputs.get("attention_mask")
        return PreparedPrompt([int(t) for t in input_ids.flatten().tolist()], {"input_ids": input_ids, **extra})

    def _check_text(self, messages: Sequence[dict[str, Any]], with_images: bool) -> None:
        """Refuse control tokens in system, user and tool text (tool results are outside text too),
        and image placeholders anywhere when the prompt has images (the model's own earlier
        replies may hold other control tokens)."""
        for message in messages:
            if message.get("role") in ("system", "user", "tool"):
                reserved = self._control
            else:
                reserved = self._placeholders if with_images else []
            for text in _texts(message):
                token = next((t for t in reserved if t in text), None)
                if token is not None:
                    raise ParameterError(f"messages: the text contains {token!r}, a control token of the model "
                                         f"(an image placeholder or a chat-template marker); remove it from the "
                                         f"text, and send images as image content parts.", param="messages")

    def stream(self, prompt: PreparedPrompt, *, max_tokens: int, sampler: Any,
               logits_processors: list[Any] | None) -> Iterator[Any]:
        import mlx.core as mx

        inputs = dict(prompt.inputs) or {"input_ids": mx.array([prompt.tokens])}
        options: dict[str, Any] = {"max_tokens": max_tokens, "sampler": sampler}
        if logits_processors:
            options["logits_processors"] = logits_processors
        if self.prefill_step_size is not None:
            options["prefill_step_size"] = self.prefill_step_size
        # mlx-vlm's generate() resets the stop tokens before each call; stream_generate does not.
        self._tokenizer.stopping_criteria.reset(self._eos)
        responses = self._mlx_vlm.stream_generate(self.model, self.processor, "", **inputs, **options)
        return per_token(responses)


def _special_tokens(tokenizer: Any) -> set[str]:
    """The Hugging Face tokenizer's special added tokens (what its chat template uses as control tokens)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {token.content for token in decoder.values() if getattr(token, "special", False) and token.content}


def _texts(message: dict[str, Any]) -> Iterator[str]:
    """A message's text: its content string, or its text parts."""
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        yield from (part["text"] for part in content if isinstance(part.get("text"), str))


def per_token(responses: Iterator[Any]) -> Iterator[Any]:
    """mlx-vlm's responses as mlx-lm yields them: one per generated token, the last one with the
    finish reason. mlx-vlm ends with an extra response holding the detokenizer's remaining text
    and, after a length stop, the last token again; that one is merged into the one before."""
    held = None
    for response in responses:
        if response.token is None:  # nothing was generated
            continue
        step = SimpleNamespace(text=response.text, token=int(response.token),
                               finish_reason=getattr(response, "finish_reason", None),
                               prompt_tps=response.prompt_tps, generation_tps=response.generation_tps)
        if step.finish_reason is None:
            if held is not None:
                yield held
            held = step
            continue
        if step.finish_reason == "stop" or held is None:
            # The end-of-sequence token, which mlx-vlm does not yield on its own.
            if held is not None:
                yield held
            yield step
        else:  # "length": the same last token again, with the text left in the detokenizer
            held.text += step.text
            held.finish_reason = step.finish_reason
            held.generation_tps = step.generation_tps
            yield held
        return
    if held is not None:
        yield held
