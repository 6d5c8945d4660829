"""Continuous batching: generations on one Runtime decoded together, with mlx-lm's BatchGenerator.

A :class:`ContinuousBatch` wraps mlx-lm's ``BatchGenerator``: sequences are added at any time
and join the batch between decode steps (their prompts are prefilled by the generator, several
at a time), each :meth:`~ContinuousBatch.step` decodes one token for every sequence in the
batch with one forward pass, and a sequence leaves as soon as it finishes. In a paged MoE tier
that one pass routes all B sequences through each MoE layer in one call, so the layer makes
the union of their experts resident once per step (one read per missing expert), instead of
once per sequence.

What each sequence asked for is kept per sequence: its token budget, its sampler and logits
processors (mlx-lm's, built by :meth:`Runtime.call_settings`, as a lone call builds them), its
stop strings (matched on the text, as :meth:`Runtime.stream_tokens` does, so a stop string is
never yielded in part) and its prompt-cache entry. Greedy results are those of stock mlx-lm's
``batch_generate`` for the same batch; a request alone in its batch gets the tokens of stock
``stream_generate``. Not batched (:func:`unbatchable_reason` says why): seeded sampling (the
random stream would be shared by the batch, so the draws would depend on the other requests),
models whose KV caches mlx-lm cannot merge, and tiers split across machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx

from outlier_runtime.core.prompt_cache import PrefixCache
from outlier_runtime.core.results import Chunk, GenerationResult
from outlier_runtime.core.runtime import Runtime, _split_at_stop
from outlier_runtime.core.system import peak_rss_bytes

#: Prompts prefilled together at most (mlx-lm's own default); fewer when the batch bound is lower.
PREFILL_BATCH = 8
#: Options a batched sequence honours; a request with any other is generated alone.
BATCHED_OPTIONS = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "top_k", "min_p",
                             "repetition_penalty", "presence_penalty", "frequency_penalty"})


def generator_sizes(max_batch: int) -> dict[str, int]:
    """mlx-lm ``BatchGenerator`` sizes for a batch bound: how many sequences decode together and
    how many prompts are prefilled together. Stock ``batch_generate`` given the same sizes batches
    the same way (what the exactness tests compare against)."""
    return {"completion_batch_size": max_batch, "prefill_batch_size": min(PREFILL_BATCH, max_batch)}


def model_can_batch(runtime: Runtime) -> str | None:
    """Why ``runtime``'s model cannot decode in a batch, or None when it can."""
    from mlx_lm.models.cache import make_prompt_cache

    if not runtime.reuses_prompt_cache:
        return "a vision model runs its own generation loop (mlx-vlm), one sequence at a time"
    if (runtime.engine_stats().get("config") or {}).get("distributed"):
        return "a tier split across machines decodes one sequence at a time"
    unmergeable = sorted({type(c).__name__ for c in make_prompt_cache(runtime.model) if not hasattr(c, "merge")})
    if unmergeable:
        return f"mlx-lm cannot batch this model's KV cache ({', '.join(unmergeable)})"
    return None


def unbatchable_reason(runtime: Runtime, options: dict[str, Any]) -> str | None:
    """Why a request with ``options`` must be generated alone on ``runtime``, or None."""
    return request_reason(runtime, options) or model_can_batch(runtime)


def request_reason(runtime: Runtime, options: dict[str, Any]) -> str | None:
    """Why a request's ``options`` keep it out of a batch on ``runtime`` (any model), or None."""
    unknown = sorted(set(options) - BATCHED_OPTIONS)
    if unknown:
        return f"the option {unknown[0]!r} is generated alone"
    defaults = runtime.manifest.generation  # as Runtime.call_settings fills them in
    temperature = defaults.temperature if options.get("temperature") is None else options["temperature"]
    seed = defaults.seed if options.get("seed") is None else options["seed"]
    if temperature > 0 and seed is not None:
        return "seeded sampling is generated alone (a batch shares one random stream)"
    return None


@dataclass(eq=False)  # hashed by identity: callers map sequences to their requests
class BatchSequence:
    """One generation in a batch: its prompt, what it has produced so far, and its timings."""

    uid: int
    tokens: list[int]
    cached: int
    stop: list[str]
    detokenizer: Any
    added: float
    first_token_at: float | None = None
    text: str = ""
    #: Text that may be the start of a stop string, held back until the next piece decides it.
    held: str = ""
    out_tokens: list[int] = field(default_factory=list)


@dataclass
class BatchEvent:
    """What one step produced for one sequence: a piece of text, and/or its final result."""

    sequence: BatchSequence
    chunk: Chunk | None = None
    result: GenerationResult | None = None


class ContinuousBatch:
    """Sequences on one Runtime, decoded together; they join and leave between steps.

    ``prompt_cache`` (optional) is consulted when a sequence is added (only the prompt's tokens
    after the longest stored prefix are prefilled) and receives its KV cache when it finishes.
    Call :meth:`close` when done.
    """

    def __init__(self, runtime: Runtime, max_batch: int, prompt_cache: PrefixCache | None = None):
        from mlx_lm.generate import BatchGenerator

        self.runtime = runtime
        self.max_batch = max_batch
        self._prompt_cache = prompt_cache
        tokenizer = runtime.tokenizer
        self._generator = BatchGenerator(runtime.model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                                         **generator_sizes(max_batch))
        self._sequences: dict[int, BatchSequence] = {}
        #: Decode steps run, those that decoded two sequences or more, the most decoded at once,
        #: and the tokens decoded (one per sequence per step, end-of-sequence tokens included).
        self.decode_steps = 0
        self.batched_steps = 0
        self.largest_batch = 0
        self.decoded_tokens = 0

    def __len__(self) -> int:
        return len(self._sequences)

    def add(self, tokens: Sequence[int], *, stop: Sequence[str] = (), **options: Any) -> BatchSequence:
        """Queue a generation of ``tokens`` (options as :meth:`Runtime.stream_tokens` takes them);
        its prompt is prefilled by the next steps, then it decodes with the others."""
        tokens = list(tokens)
        self.runtime.call_settings(tokens, **options)  # a bad option fails before a cache is taken
        if not self._sequences:
            with self.runtime.exclusive() as loaded:
                loaded.reset_stats()  # the engine statistics of a batch cover the batch
            mx.reset_peak_memory()
        cache, cached = None, 0
        if self._prompt_cache is not None:
            reuse = self._prompt_cache.fetch(self.runtime.name, self.runtime.model, tokens)
            cache, cached = reuse.cache, reuse.cached
        settings = self.runtime.call_settings(tokens, cached, **options)
        # Greedy sequences share mlx-lm's default sampler, so the batch samples them in one call.
        sampler = None if settings.temperature == 0 else settings.sampler
        (uid,) = self._generator.insert([tokens[cached:]], max_tokens=[settings.budget], caches=[cache],
                                        samplers=[sampler], logits_processors=[settings.processors])
        sequence = BatchSequence(uid, tokens, cached, [s for s in stop if s], self.runtime.tokenizer.detokenizer,
                                 time.perf_counter())
        self._sequences[uid] = sequence
        return sequence

    def cancel(self, sequence: BatchSequence) -> None:
        """Drop a sequence (its client left); its KV cache is not kept."""
        if self._sequences.pop(sequence.uid, None) is not None:
            self._generator.remove([sequence.uid])

    def step(self) -> list[BatchEvent]:
        """One step of the generator: one token for every decoding sequence, and prefill of the
        prompts waiting to join (a long prompt in chunks, over several steps)."""
        with self.runtime.exclusive():
            _, responses = self._generator.next()
        if responses:
            self.decode_steps += 1
            self.batched_steps += int(len(responses) >= 2)
            self.largest_batch = max(self.largest_batch, len(responses))
            self.decoded_tokens += len(responses)
        now = time.perf_counter()
        events = []
        for response in responses:
            sequence = self._sequences.get(response.uid)
            if sequence is not None:
                events.extend(self._advance(sequence, response, now))
        return events

    def close(self) -> None:
        """Stop every sequence and restore what the generator changed (Metal's wired limit)."""
        if self._sequences:
            self._generator.remove(list(self._sequences))
            self._sequences.clear()
        self._generator.close()

    def _advance(self, sequence: BatchSequence, response: Any, now: float) -> list[BatchEvent]:
        """Detokenize one response and match stop strings, as :meth:`Runtime.stream_tokens` does."""
        if sequence.first_token_at is None:
            sequence.first_token_at = now
        detokenizer = sequence.detokenizer
        finish = response.finish_reason
        if finish != "stop":  # the end-of-sequence token is not text
            detokenizer.add_token(response.token)
            sequence.out_tokens.append(response.token)
        if finish is not None:
            detokenizer.finalize()
        piece, sequence.held, hit = _split_at_stop(sequence.held + detokenizer.last_segment, sequence.stop)
        sequence.text += piece
        events = [BatchEvent(sequence, chunk=Chunk(piece, response.token))] if piece else []
        cache = response.prompt_cache  # given by the generator to a sequence it finished
        if hit:
            if finish is None:  # still in the generator's batch: take it out, with its cache
                cache = self._generator.remove([sequence.uid], return_prompt_caches=True)[sequence.uid][0]
            finish = "stop"
        if finish is None:
            return events
        if sequence.held and not hit:
            sequence.text += sequence.held
            events.append(BatchEvent(sequence, chunk=Chunk(sequence.held, response.token)))
        del self._sequences[sequence.uid]
        if self._prompt_cache is not None and cache is not None:
            self._prompt_cache.store(self.runtime.name, cache, [*sequence.tokens, *sequence.out_tokens])
        events.append(BatchEvent(sequence, result=self._result(sequence, finish, now)))
        return events

    def _result(self, sequence: BatchSequence, finish: str, now: float) -> GenerationResult:
        first = sequence.first_token_at or now
        prefilled = len(sequence.tokens) - sequence.cached
        generated = len(sequence.out_tokens)
        with self.runtime.exclusive() as loaded:
            engine = loaded.stats()
        return GenerationResult(
            text=sequence.text,
            tokens=list(sequence.out_tokens),
            prompt_tokens=len(sequence.tokens),
            generation_tokens=generated,
            prompt_tps=prefilled / (first - sequence.added) if first > sequence.added else 0.0,
            generation_tps=generated / (now - first) if now > first else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            peak_rss_gb=peak_rss_bytes() / 1e9,
            finish_reason=finish,
            tier=self.runtime.name,
            engine=engine,
            cached_tokens=sequence.cached,
        )


def generate_together(runtime: Runtime, prompts: Sequence[Sequence[int]], *, max_batch: int | None = None,
                      prompt_cache: PrefixCache | None = None, **options: Any) -> list[GenerationResult]:
    """Generate every prompt in one batch (all added before the first step); results in prompt order."""
    batch = ContinuousBatch(runtime, max_batch or len(prompts), prompt_cache)
    try:
        sequences = [batch.add(tokens, **options) for tokens in prompts]
        results: dict[BatchSequence, GenerationResult] = {}
        while len(batch):
            for event in batch.step():
                if event.result is not None:
                    results[event.sequence] = event.result
        return [results[sequence] for sequence in sequences]
    finally:
        batch.close()
