"""The sampler and logits processors one generation call asks for, built with mlx-lm's own
``make_sampler`` and ``make_logits_processors`` so that sampling stays stock."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx

from outlier_runtime.core.params import GenerationParams


def make_sampler(params: GenerationParams, temperature: float, top_p: float, vocab_size: int | None) -> Callable:
    """mlx-lm's sampler for the call's temperature, top_p, top_k and min_p (temperature 0: greedy)."""
    from mlx_lm.sample_utils import make_sampler as stock_sampler

    top_k = params.top_k or 0
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0  # keeping every token is no filter (mlx-lm refuses k >= the vocabulary)
    return stock_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=params.min_p or 0.0)


def make_logits_processors(params: GenerationParams, cached: Sequence[int] = ()) -> list[Callable]:
    """mlx-lm's penalty processors for the call, or none.

    With a prompt cache, mlx-lm hands a processor only the tokens it prefilled and generated;
    the ``cached`` tokens before them are put back in front, so a penalty sees the same
    context with or without the cache.
    """
    from mlx_lm.sample_utils import make_logits_processors as stock_processors

    processors = stock_processors(repetition_penalty=params.repetition_penalty,
                                  presence_penalty=params.presence_penalty,
                                  frequency_penalty=params.frequency_penalty)
    if not cached or not processors:
        return processors
    prefix = mx.array(list(cached))

    def with_prefix(processor: Callable) -> Callable:
        def process(tokens: Any, logits: Any) -> Any:
            return processor(mx.concatenate([prefix, tokens.astype(prefix.dtype)]), logits)
        return process

    return [with_prefix(processor) for processor in processors]


def vocab_size(model: Any) -> int | None:
    """The model's output width where its config says it (``args.vocab_size``), else None."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None) or getattr(getattr(args, "text_config", None), "vocab_size", None)
    return size if isinstance(size, int) else None
