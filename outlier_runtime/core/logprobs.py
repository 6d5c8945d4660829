"""Log probabilities of generated tokens, as OpenAI's ``logprobs`` / ``top_logprobs`` report them.

mlx-lm's ``stream_generate`` hands every step's log-softmax over the vocabulary (after the
call's logits processors, before the sampler's temperature); this module reads the chosen
token's value and the ``top`` most likely alternatives from it, with each token's text and
its exact bytes (a byte-level BPE token may hold part of a UTF-8 character).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

#: OpenAI's bound on ``top_logprobs`` (chat); the legacy completions' ``logprobs`` is at most 5.
MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """One token's log probability, its text and bytes, and the most likely alternatives."""

    token: int
    text: str
    bytes: list[int]
    logprob: float
    #: The most likely tokens at this step, most likely first (their own ``top`` empty).
    top: list["TokenLogprob"] = field(default_factory=list)


class TokenTexts:
    """Each token id's bytes and text, read the way mlx-lm's detokenizer reads them."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._byte_level = type(getattr(tokenizer, "_detokenizer", None)).__name__ == "BPEStreamingDetokenizer"
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            if self._byte_level:
                from mlx_lm.tokenizer_utils import _byte_decoder

                decoder = _byte_decoder()
                piece = self._tokenizer.convert_ids_to_tokens(token) or ""
                raw = b"".join(bytes([decoder[c]]) if c in decoder else c.encode() for c in piece)
            else:
                raw = self._tokenizer.decode([token]).encode()
            found = (raw.decode("utf-8", errors="replace"), list(raw))
            if len(self._cache) < 100_000:
                self._cache[token] = found
        return found


def token_logprob(logprobs: mx.array, token: int, top: int, texts: TokenTexts) -> TokenLogprob:
    """``token``'s entry from one step's log-softmax vector, with the ``top`` best alternatives."""
    alternatives: list[TokenLogprob] = []
    if top > 0:
        top = min(top, logprobs.shape[-1])
        best = mx.argpartition(-logprobs, kth=top - 1)[:top]
        values = logprobs[best]
        order = mx.argsort(-values)
        for tid, value in zip(best[order].tolist(), values[order].tolist()):
            text, raw = texts.of(int(tid))
            alternatives.append(TokenLogprob(int(tid), text, raw, float(value)))
    text, raw = texts.of(token)
    return TokenLogprob(token, text, raw, float(logprobs[token].item()), alternatives)
