"""The model host: the one resident Runtime, and the worker thread that runs all model work.

Loading, switching and generating all happen on a single worker thread, so requests queue
in arrival order and never interleave inside a model; switching tiers closes the previous
Runtime before loading the next. A :class:`GenerationJob` carries one request's generation
and hands its events (started, chunk, done, error) to the event loop through an asyncio
queue; setting its ``cancelled`` flag stops the generation at the next chunk. Every generation
starts from the host's :class:`~outlier_runtime.core.prompt_cache.PrefixCache`, so a request
prefills only the tokens after the longest prefix an earlier request left in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from outlier_runtime.core.errors import AdmissionError, OutlierError, ParameterError, TierNotFoundError
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.params import check_generation
from outlier_runtime.core.prompt_cache import PrefixCache
from outlier_runtime.serve.openai_api import MODEL_PREFIX, ApiError
from outlier_runtime.core.runtime import Prompt, Runtime
from outlier_runtime.serve.models_api import check_downloaded

log = logging.getLogger(__name__)


@dataclass
class GenerationJob:
    """One request's generation, run on the worker; events flow back to the event loop."""

    tier: str
    prompt: Prompt
    chat: bool
    prompt_param: str  # "messages" or "prompt": the field a too-long prompt is blamed on
    max_tokens: int | None
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class ModelHost:
    """Holds the one resident Runtime and runs all model work on a single worker thread."""

    def __init__(self, load_overrides: Callable[[str], dict[str, Any]] = lambda tier: {}, force: bool = False,
                 prompt_cache_bytes: int = 0, allow_download: bool = False):
        self._load_overrides = load_overrides  # tier -> keyword overrides for load()
        self._force = force
        #: Whether a request may load a tier whose weights must be downloaded first.
        self._allow_download = allow_download
        #: KV caches of earlier requests by prefix (0 bytes: every request prefills its whole prompt).
        self.prompt_cache = PrefixCache(prompt_cache_bytes)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outlier-model")
        self._runtime: Runtime | None = None
        self.last_stats: dict[str, Any] | None = None

    @property
    def loaded_tier(self) -> str | None:
        runtime = self._runtime
        return runtime.name if runtime is not None else None

    def served_tiers(self) -> list[dict[str, Any]]:
        """Tiers with a valid manifest that this machine can run (every valid one with --force)."""
        import outlier_runtime

        return [row for row in outlier_runtime.tiers()
                if row["error"] is None and (row["runnable"] or self._force)]

    def tier_for(self, model: str) -> str:
        names = [row["name"] for row in self.served_tiers()]
        tier = model[len(MODEL_PREFIX):] if model.startswith(MODEL_PREFIX) else None
        if tier not in names:
            available = ", ".join(MODEL_PREFIX + name for name in names) or "none"
            raise ApiError(404, f"The model {model!r} does not exist or cannot run on this machine. "
                                f"Available: {available}.", param="model", code="model_not_found")
        return tier

    def manifest(self, tier: str) -> TierManifest:
        """The tier's manifest as this server loads it (its load overrides applied)."""
        from outlier_runtime.core.catalog import resolve_tier
        from outlier_runtime.core.plugin_manager import get_registry

        return resolve_tier(tier, get_registry(), self._load_overrides(tier))

    def submit(self, job: GenerationJob) -> None:
        self._worker.submit(self._generate, job)

    def preload(self, tier: str) -> None:
        self._worker.submit(self._preload, tier)

    def close(self) -> None:
        """Finish queued work, then free the resident model."""
        self._worker.submit(self._unload)
        self._worker.shutdown(wait=True)

    def _prompt_cache_stats(self, result: Any) -> dict[str, Any]:
        """The last request's cached and prefilled prompt tokens, and what the prompt cache holds."""
        cache = self.prompt_cache
        return {"cached_tokens": result.cached_tokens if result else 0,
                "prefill_tokens": result.prefill_tokens if result else 0,
                "entries": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes}

    # Everything below runs on the worker thread only.

    def _unload(self) -> None:
        if self._runtime is not None:
            log.info("closing tier %s", self._runtime.name)
            self._runtime.close()
            self._runtime = None
            self.prompt_cache.clear()  # caches of a model that is gone only take memory

    def _preload(self, tier: str) -> None:
        try:
            self._ensure(tier)
        except Exception:  # the server keeps running; a request for the tier will say why
            log.exception("could not preload tier %s", tier)

    def _ensure(self, tier: str) -> Runtime:
        import outlier_runtime

        if self._runtime is None or self._runtime.name != tier:
            self._unload()
            self._runtime = outlier_runtime.load(tier, force=self._force, **self._load_overrides(tier))
        return self._runtime

    def _generate(self, job: GenerationJob) -> None:
        if job.cancelled.is_set():
            return  # the client left while the request was queued
        try:
            if not self._allow_download and self.loaded_tier != job.tier:
                check_downloaded(job.tier, self.manifest(job.tier))
            runtime = self._ensure(job.tier)
            # Refused before a template wraps an empty prompt, and before a stored cache is taken.
            check_generation(job.prompt, **{k: v for k, v in job.options.items() if k != "stop"})
            tokens = runtime.encode(job.prompt, chat=job.chat)
            prompt_tokens = len(tokens)
            budget = token_budget(runtime, prompt_tokens, job.max_tokens, job.prompt_param)
            job.emit("started", prompt_tokens)
            with contextlib.closing(self.prompt_cache.stream(runtime, tokens, max_tokens=budget,
                                                             **job.options)) as chunks:
                for chunk in chunks:
                    job.emit("chunk", chunk.text)
                    if job.cancelled.is_set():
                        log.info("client disconnected: stopped generating on tier %s", job.tier)
                        return
            result = runtime.last_result
            self.last_stats = {"tier": runtime.name, "result": result.to_dict() if result else None,
                               "prompt_cache": self._prompt_cache_stats(result)}
            if result is not None:
                log.info("tier %s: %d prompt tokens, %d from the prompt cache, %d prefilled; %d generated",
                         runtime.name, result.prompt_tokens, result.cached_tokens, result.prefill_tokens,
                         result.generation_tokens)
            job.emit("done", result)
        except ApiError as exc:
            job.emit("error", exc)
        except ParameterError as exc:  # the runtime's own checks (an empty prompt, a bad top_p, ...)
            job.emit("error", ApiError(400, str(exc), param=exc.param))
        except (TierNotFoundError, AdmissionError) as exc:
            job.emit("error", ApiError(400, str(exc), param="model"))
        except OutlierError as exc:
            log.error("tier %s failed: %s", job.tier, exc)
            job.emit("error", ApiError(500, str(exc), type="server_error"))
        except Exception:
            log.exception("generation on tier %s failed", job.tier)
            job.emit("error", ApiError(500, "The server failed while generating; see its log.",
                                       type="server_error"))


def token_budget(runtime: Runtime, prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
    """Tokens to generate: the request's (validated) or the tier's default, within the context window."""
    generation = runtime.manifest.generation
    window = generation.context_window
    if prompt_tokens >= window:
        raise ApiError(400, f"This model's maximum context length is {window} tokens, and the prompt has "
                            f"{prompt_tokens}. Shorten the prompt.",
                       param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return min(generation.max_tokens, window - prompt_tokens)
    if prompt_tokens + requested > window:
        raise ApiError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} "
                            f"for the completion). Lower max_tokens or shorten the prompt.",
                       param="max_tokens", code="context_length_exceeded")
    return requested
