"""The Runtime: a loaded tier that generates text. ``load()`` builds one from a tier name."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Sequence, Union

import mlx.core as mx

from outlier_runtime.core.chat_encoding import encode_chat
from outlier_runtime.core.env_flags import check_env_flags
from outlier_runtime.core.errors import ParameterError, RuntimeClosedError
from outlier_runtime.core.images import ImageInput, check_tier_takes_images, load_images, split_images
from outlier_runtime.core.logprobs import TokenLogprob, TokenTexts, token_logprob
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.memory import MemoryPlan, PlanLine
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.params import check_generation, token_budget
from outlier_runtime.core.protocols import LoadedModel, LoadRequest, PreparedPrompt
from outlier_runtime.core.resolve import resolve_model
from outlier_runtime.core.results import Chunk, GenerationResult
from outlier_runtime.core.sampling import make_logits_processors, make_sampler, vocab_size
from outlier_runtime.core.system import peak_rss_bytes
from outlier_runtime.core.catalog import check_admission, memory_plan, plans_memory, resolve_tier

log = logging.getLogger(__name__)

Message = dict[str, Any]

#: load() overrides that are also per-call generation parameters.
GENERATION_OVERRIDES = ("max_tokens", "temperature", "top_p", "seed")
Prompt = Union[str, Sequence[Message]]


def load(tier: str, *, force: bool = False, reserve: Sequence[PlanLine] = (), **overrides: Any) -> "Runtime":
    """Load a tier by name. Keyword overrides replace manifest knobs (``cache_gb=4, model="/path"``).

    ``force=True`` loads even when the machine has less RAM than the tier asks for. ``reserve``:
    memory the caller keeps beside the model (the server's prompt cache), a line of the tier's
    memory plan that admission counts.
    """
    manifest, model_path, plan = admit(tier, force=force, reserve=reserve, **overrides)
    registry = get_registry()
    loader = registry.create("loader", manifest.loader.name)
    log.info("loading tier %s from %s with loader %s", manifest.name, model_path, manifest.loader.name)
    started = time.perf_counter()
    loaded = registry.get("loader", manifest.loader.name).guard.call(
        "load", loader.load, LoadRequest(manifest, model_path, manifest.loader_options, reserved=tuple(reserve)))
    log.info("loaded in %.2f s", time.perf_counter() - started)
    runtime = Runtime(manifest, loaded)
    runtime.memory_plan = plan
    return runtime


def admit(tier: str, *, force: bool = False, reserve: Sequence[PlanLine] = (),
          **overrides: Any) -> tuple[TierManifest, Any, MemoryPlan | None]:
    """What :func:`load` checks before loading anything: the tier resolves, its model is on disk
    and this machine admits it. Returns the manifest, the model's path and the memory plan (None
    for loaders without one); raises the error ``load`` would."""
    check_env_flags()
    # Generation defaults given as overrides get the same check (and message) as per-call values.
    check_generation(**{k: overrides[k] for k in GENERATION_OVERRIDES if overrides.get(k) is not None})
    registry = get_registry()
    manifest = resolve_tier(tier, registry, overrides)
    plan = None
    if plans_memory(manifest, registry):
        # The plan reads the checkpoint's headers: the model must be on disk first.
        model_path = resolve_model(manifest.model, manifest.name)
        plan = memory_plan(manifest, registry, model_path, reserved=reserve)
        for note in plan.notes:
            log.info("tier %s: %s", manifest.name, note)
        for warning in plan.warnings:
            log.warning("tier %s: %s", manifest.name, warning)
        check_admission(manifest, force=force, plan=plan)
    else:
        check_admission(manifest, force=force)
        model_path = resolve_model(manifest.model, manifest.name)
    return manifest, model_path, plan


@dataclass
class CallSettings:
    """One generation call's parameters with the tier's defaults filled in."""

    #: Tokens to generate at most.
    budget: int
    temperature: float
    seed: int | None
    #: mlx-lm's sampler (greedy at temperature 0) and logits processors (penalties), or none.
    sampler: Callable
    processors: list[Callable]


class Runtime:
    """A tier's model, ready to generate. Calls from several threads are serialized."""

    def __init__(self, manifest: TierManifest, loaded: LoadedModel):
        self.manifest = manifest
        self._loaded: LoadedModel | None = loaded
        self._lock = threading.Lock()
        self.last_result: GenerationResult | None = None
        #: The loader's memory plan this tier was admitted with (paged tiers), else None.
        self.memory_plan: MemoryPlan | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def model(self) -> Any:
        return self._require().model

    @property
    def tokenizer(self) -> Any:
        return self._require().tokenizer

    def _require(self) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeClosedError(f"Runtime for tier {self.name!r} is closed; load it again.")
        return self._loaded

    @property
    def accepts_images(self) -> bool:
        """Whether this tier takes images: its manifest says so and its loader built a vision model."""
        return self.manifest.model.image_input and self._require().vision is not None

    @property
    def reuses_prompt_cache(self) -> bool:
        """Whether :meth:`stream_tokens` takes mlx-lm prompt caches (text-only models; a vision
        model runs its own loop, so its prompts are prefilled whole)."""
        return self._require().vision is None

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse a generation option this tier's model cannot honour, before any work starts."""
        if options.get("top_logprobs") is not None and not self.reuses_prompt_cache:
            raise ParameterError(f"logprobs: tier {self.name!r} runs a vision model (mlx-vlm's loop), which "
                                 f"reports no log probabilities here; leave logprobs out.", param="logprobs")

    def _check_images_allowed(self) -> None:
        check_tier_takes_images(self.manifest)
        if self._require().vision is None:
            raise ParameterError(
                f"images: tier {self.name!r} sets image_input but its loader {self.manifest.loader.name!r} "
                f"builds a text-only model; use `[loader] name = \"vlm\"` "
                f"(pip install 'outlier-runtime[vision]').", param="images")

    def _messages(self, prompt: Prompt, chat: bool | None) -> list[Message] | None:
        """The chat messages to render (system prompt added), or None for a raw completion."""
        if isinstance(prompt, str):
            use_chat = self.manifest.generation.use_chat_template if chat is None else chat
            if not use_chat:
                return None
            messages: list[Message] = [{"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
        defaults = self.manifest.generation
        if defaults.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": defaults.system_prompt})
        return messages

    def prepare(self, prompt: Prompt, chat: bool | None = None, images: Sequence[ImageInput] | None = None,
                tools: Sequence[dict[str, Any]] | None = None) -> PreparedPrompt:
        """Token ids and model inputs for a prompt with images (in its messages, or ``images``) and
        ``tools`` (OpenAI function definitions, rendered by the chat template)."""
        template_prompt: Any = prompt
        sources: list[Any] = []
        if not isinstance(prompt, str):
            template_prompt, sources = split_images(prompt)
        sources += list(images or ())
        if sources:
            self._check_images_allowed()
        decoded = load_images(sources)
        vision = self._require().vision
        messages = self._messages(template_prompt, chat)
        if vision is None:  # a text-only model, given text only
            return PreparedPrompt(self._encode_text(template_prompt, messages, tools))
        if tools:
            raise ParameterError(f"tools: tier {self.name!r} runs a vision model, whose prompts take no tools here.",
                                 param="tools")
        if messages is None and decoded:
            raise ParameterError("images: a raw completion (--raw, chat=False) has no place for images; "
                                 "use the chat template (--chat, chat=True).", param="images")
        return vision.prepare(template_prompt if messages is None else messages, decoded, messages is not None)

    def _encode_text(self, prompt: Any, messages: list[Message] | None,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        tokenizer = self.tokenizer
        if messages is None or (isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None)):
            return list(tokenizer.encode(prompt))
        return encode_chat(tokenizer, messages, tools)  # message content is text, never control tokens

    def engine_stats(self) -> dict[str, Any]:
        """The engine's statistics since the last generation started."""
        return self._require().stats()

    def encode(self, prompt: Prompt, chat: bool | None = None, tools: Sequence[dict[str, Any]] | None = None,
               images: Sequence[ImageInput] | None = None) -> list[int]:
        """Token ids for a prompt: a string (raw, or chat-wrapped) or a list of chat messages (with
        image parts on a vision tier; each image counts its placeholder tokens); ``tools`` (OpenAI
        function definitions) are rendered by the chat template."""
        return self.prepare(prompt, chat, images, tools).tokens

    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        images: Sequence[ImageInput] | None = None,
        **sampling: Any,
    ) -> Generator[Chunk, None, GenerationResult]:
        """Yield text chunks as they are generated; ``self.last_result`` holds the totals after.

        ``images`` (vision tiers): paths, encoded bytes, PIL images or ``data:`` URLs, placed
        before the prompt's text; chat messages may also carry image content parts.
        ``sampling`` takes ``top_k``, ``min_p``, ``repetition_penalty``, ``presence_penalty`` and
        ``frequency_penalty`` (mlx-lm's sampler and logits processors)."""
        check_generation(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         images=None if images is None else list(images), **sampling)
        prepared = self.prepare(prompt, chat, images)
        return (yield from self.stream_prepared(prepared, max_tokens=max_tokens, temperature=temperature,
                                                top_p=top_p, seed=seed, stop=stop, **sampling))

    def stream_tokens(
        self,
        tokens: Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        prompt_cache: list[Any] | None = None,
        cached: int = 0,
        top_logprobs: int | None = None,
        **sampling: Any,
    ) -> Generator[Chunk, None, GenerationResult]:
        """:meth:`stream` from token ids. With an mlx-lm ``prompt_cache`` that already holds the
        first ``cached`` tokens, only the rest are prefilled (multi-turn chat, the server's
        prompt cache); the result's ``cached_tokens`` says how many were not. With
        ``top_logprobs`` (0 or more), each chunk and the result carry every generated token's log
        probability and that many most likely alternatives (:mod:`.logprobs`)."""
        return (yield from self.stream_prepared(PreparedPrompt(list(tokens)), max_tokens=max_tokens,
                                                temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                                prompt_cache=prompt_cache, cached=cached,
                                                top_logprobs=top_logprobs, **sampling))

    def stream_prepared(
        self,
        prepared: PreparedPrompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        prompt_cache: list[Any] | None = None,
        cached: int = 0,
        top_logprobs: int | None = None,
        **sampling: Any,
    ) -> Generator[Chunk, None, GenerationResult]:
        """:meth:`stream` from :meth:`prepare`'s result (its images decoded and processed once)."""
        from mlx_lm import stream_generate

        tokens = prepared.tokens
        self.check_options({"top_logprobs": top_logprobs})
        settings = self.call_settings(tokens, cached, max_tokens=max_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed, top_logprobs=top_logprobs,
                                      **sampling)
        budget, sampler, processors, seed = settings.budget, settings.sampler, settings.processors, settings.seed
        new_tokens = list(tokens[cached:])
        if not new_tokens:
            raise ParameterError(f"stream_tokens: the cache already holds all {len(tokens)} tokens; "
                                 f"pass cached < len(tokens) so there is a token to start from.")
        with self._lock:
            loaded = self._require()
            if seed is not None:
                mx.random.seed(seed)
            loaded.reset_stats()
            mx.reset_peak_memory()
            text, out_tokens, last = "", [], None
            finish: str | None = None
            # Text that may be the start of a stop string is held back until the next piece
            # decides it, so a stop string split across two tokens is never yielded in part.
            held, hit = "", False
            texts = TokenTexts(loaded.tokenizer) if top_logprobs is not None else None
            entries: list[TokenLogprob] = []  # every generated token's, when asked for
            unsent = 0  # entries[unsent:] belong to text not yet yielded
            extra: dict[str, Any] = {} if prompt_cache is None else {"prompt_cache": prompt_cache}
            if processors:
                extra["logits_processors"] = processors
            if loaded.vision is not None:
                if prompt_cache is not None or cached:
                    raise ParameterError(f"stream_tokens: tier {self.name!r} runs a vision model, which takes no "
                                         f"mlx-lm prompt cache; call it without prompt_cache and cached.")
                responses = loaded.vision.stream(prepared, max_tokens=budget, sampler=sampler,
                                                 logits_processors=processors or None)
            else:
                responses = stream_generate(loaded.model, loaded.tokenizer, mx.array(new_tokens),
                                            max_tokens=budget, sampler=sampler, **extra)
            for response in _explained(loaded, responses):
                last = response
                out_tokens.append(response.token)
                if texts is not None and response.finish_reason != "stop":  # not the end-of-sequence token
                    entries.append(token_logprob(response.logprobs, response.token, top_logprobs, texts))
                piece, held, hit = _split_at_stop(held + response.text, stop)
                text += piece
                if piece:
                    yield Chunk(piece, response.token, entries[unsent:])
                    unsent = len(entries)
                if hit:
                    finish = "stop"
                    break
                finish = response.finish_reason
            if held and not hit:
                text += held
                yield Chunk(held, last.token, entries[unsent:])
            if last is not None and finish == "stop" and last.finish_reason == "stop":
                out_tokens = out_tokens[:-1]  # the end-of-sequence token is not part of the text
            self.last_result = GenerationResult(
                text=text,
                tokens=out_tokens,
                prompt_tokens=len(tokens),
                generation_tokens=len(out_tokens),
                prompt_tps=last.prompt_tps if last else 0.0,
                generation_tps=last.generation_tps if last else 0.0,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                peak_rss_gb=peak_rss_bytes() / 1e9,
                finish_reason=finish,
                tier=self.name,
                engine=(loaded.result_stats or loaded.stats)(),
                cached_tokens=cached,
                logprobs=entries[:len(out_tokens)] if texts is not None else None,
            )
            return self.last_result

    def call_settings(self, tokens: Sequence[int], cached: int = 0, *, max_tokens: int | None = None,
                      temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                      **sampling: Any) -> CallSettings:
        """One call's parameters, checked, with this tier's defaults filled in: the token budget and
        mlx-lm's sampler and logits processors for ``tokens`` (of which a cache holds ``cached``)."""
        params = check_generation(list(tokens), max_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed, **sampling)
        defaults = self.manifest.generation
        temp = defaults.temperature if params.temperature is None else params.temperature
        return CallSettings(
            budget=token_budget(len(tokens), params.max_tokens, defaults.max_tokens, defaults.context_window),
            temperature=temp,
            seed=defaults.seed if params.seed is None else params.seed,
            sampler=make_sampler(params, temp, defaults.top_p if params.top_p is None else params.top_p,
                                 vocab_size(self.model)),
            processors=make_logits_processors(params, tokens[:cached]),
        )

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[LoadedModel]:
        """The loaded model, held for one unit of work done outside :meth:`stream_tokens` (a step of
        a batch): no other call on this runtime runs meanwhile."""
        with self._lock:
            yield self._require()

    def generate(self, prompt: Prompt, **options: Any) -> GenerationResult:
        """Generate a completion and return it with its statistics (see :meth:`stream` for options)."""
        # The stream's return value, not self.last_result: another thread may set that as soon
        # as this call releases the lock.
        chunks = self.stream(prompt, **options)
        while True:
            try:
                next(chunks)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        """Free the model and everything the loader holds. Safe to call twice."""
        with self._lock:
            if self._loaded is None:
                return
            self._loaded.close()
            self._loaded = None
        gc.collect()
        mx.clear_cache()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _explained(loaded: LoadedModel, responses: Iterator[Any]) -> Iterator[Any]:
    """``responses``, with an error raised while generating passed through the loader's
    ``explain_error`` (a distributed loader names the rank and the peer it lost)."""
    try:
        yield from responses
    except Exception as exc:
        explained = loaded.explain_error(exc)
        if explained is None or explained is exc:
            raise
        raise explained from exc


def _split_at_stop(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split new text into (text to yield, text to hold back, whether a stop string was hit).

    On a hit, the text before the first stop string is yielded. Otherwise the longest tail of
    ``pending`` that begins some stop string is held back. ``pending`` is the held text plus one
    new piece, so the work per token is linear in it and in the stop strings, never quadratic:
    only the last ``len(stop) - 1`` characters can begin a stop string, and only the positions
    there that hold the stop string's first character are tried.
    """
    stops = [s for s in stops if s]
    positions = [p for p in (pending.find(s) for s in stops) if p >= 0]
    if positions:
        return pending[:min(positions)], "", True
    cut = len(pending)
    for stop in stops:
        start = max(0, len(pending) - len(stop) + 1)
        while start < cut:
            start = pending.find(stop[0], start, cut)
            if start < 0:
                break
            if stop.startswith(pending[start:]):
                cut = start  # the earliest such start holds back the longest tail
                break
            start += 1
    return pending[:cut], pending[cut:], False
