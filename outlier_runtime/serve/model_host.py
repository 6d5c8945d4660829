"""The model host: the one resident Runtime, and the worker thread that runs all model work.

Loading, switching and generating all happen on a single worker thread, so requests queue
in arrival order and never interleave inside a model; switching tiers closes the previous
Runtime before loading the next. A :class:`GenerationJob` carries one request's generation
and hands its events (started, chunk, done, error) to the event loop through an asyncio
queue; setting its ``cancelled`` flag stops the generation at the next chunk. Every generation
starts from the host's :class:`~outlier_runtime.core.prompt_cache.PrefixCache`, so a request
prefills only the tokens after the longest prefix an earlier request left in it.

The served tiers are resolved once (off the event loop) and again only on :meth:`refresh_tiers`
(SIGHUP): reading manifests per request would stall every client behind a large one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from outlier_runtime.core.errors import AdmissionError, OutlierError, ParameterError, TierNotFoundError
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.params import check_generation
from outlier_runtime.core.images import has_images
from outlier_runtime.core.prompt_cache import PrefixCache
from outlier_runtime.serve.openai_api import MODEL_PREFIX, ApiError
from outlier_runtime.core.runtime import Prompt, Runtime
from outlier_runtime.serve.models_api import check_downloaded

log = logging.getLogger(__name__)

#: Requests waiting for the worker; more get 503 (each holds its prompt in memory).
MAX_QUEUED_JOBS = 64
#: A prompt longer than this many characters per context-window token cannot fit: refused
#: before tokenizing (tokenizers use far more memory than the text). Generous on purpose:
#: tokens of long runs of spaces or punctuation can be this long.
MAX_CHARS_PER_TOKEN = 32
#: How long shutdown waits for the worker to stop (queued jobs are cancelled, not run).
SHUTDOWN_SECONDS = 10.0


@dataclass(eq=False)  # hashed by identity: the host keeps a set of its jobs
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
        self._tiers: list[dict[str, Any]] | None = None
        self._jobs: set[GenerationJob] = set()  # submitted and not finished
        self._jobs_lock = threading.Lock()
        #: Counters only: never a request's or a reply's text (anyone with the key may read them).
        self.counters = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "refused_busy": 0,
                         "prompt_tokens": 0, "generation_tokens": 0}
        self.last_stats: dict[str, Any] | None = None

    @property
    def loaded_tier(self) -> str | None:
        runtime = self._runtime
        return runtime.name if runtime is not None else None

    def refresh_tiers(self) -> list[dict[str, Any]]:
        """Read the manifests again (at start, and on SIGHUP); blocking: call it off the event loop."""
        import outlier_runtime

        started = time.perf_counter()
        # A paged tier is admitted by its memory plan when it loads (with this server's overrides,
        # e.g. another model), not by the headline figure the listing falls back to.
        self._tiers = [row for row in outlier_runtime.tiers()
                       if row["error"] is None and (row["runnable"] or row["admitted_by_plan"] or self._force)]
        log.info("serving %d tiers (manifests read in %.2f s)", len(self._tiers), time.perf_counter() - started)
        return self._tiers

    def served_tiers(self) -> list[dict[str, Any]]:
        """Tiers with a valid manifest that this machine can run, or whose loader plans memory at load
        (every valid one with --force)."""
        return self._tiers if self._tiers is not None else self.refresh_tiers()

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
        with self._jobs_lock:
            if len(self._jobs) >= MAX_QUEUED_JOBS:
                self.counters["refused_busy"] += 1
                raise ApiError(503, f"The server has {MAX_QUEUED_JOBS} requests queued; retry shortly.",
                               type="server_error", code="server_busy")
            self._jobs.add(job)
            self.counters["requests"] += 1
        self._worker.submit(self._generate, job)

    def preload(self, tier: str) -> None:
        self._worker.submit(self._preload, tier)

    def close(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Cancel queued work, stop the generation in progress, free the model; False if the worker
        did not finish within ``timeout`` seconds (a load in progress cannot be interrupted)."""
        with self._jobs_lock:
            for job in self._jobs:
                job.cancelled.set()
        done = self._worker.submit(self._unload)
        self._worker.shutdown(wait=False, cancel_futures=False)
        try:
            done.result(timeout=timeout)
        except Exception:  # noqa: BLE001 - a timeout, or a failed unload: either way, stop waiting
            log.warning("the model worker did not stop within %.0f s; exiting without it", timeout)
            return False
        return True

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
        try:
            self._run(job)
        finally:
            with self._jobs_lock:
                self._jobs.discard(job)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._jobs_lock:
            self.counters[name] += amount

    def _run(self, job: GenerationJob) -> None:
        if job.cancelled.is_set():
            self._count("cancelled")
            return  # the client left while the request was queued
        try:
            if not self._allow_download and self.loaded_tier != job.tier:
                check_downloaded(job.tier, self.manifest(job.tier))
            runtime = self._ensure(job.tier)
            # Refused before a template wraps an empty prompt, and before a stored cache is taken;
            # an oversized prompt is refused by its size before it is tokenized.
            check_generation(job.prompt, **{k: v for k, v in job.options.items() if k != "stop"})
            check_prompt_size(runtime, job.prompt, job.prompt_param)
            tokens = runtime.encode(job.prompt, chat=job.chat)
            prompt_tokens = len(tokens)
            budget = token_budget(runtime, prompt_tokens, job.max_tokens, job.prompt_param)
            job.emit("started", prompt_tokens)
            if has_images(job.prompt):  # the images go with the messages; no KV cache holds pixels
                stream = runtime.stream(job.prompt, chat=job.chat, max_tokens=budget, **job.options)
            else:
                stream = self.prompt_cache.stream(runtime, tokens, max_tokens=budget, **job.options)
            with contextlib.closing(stream) as chunks:
                for chunk in chunks:
                    job.emit("chunk", chunk.text)
                    if job.cancelled.is_set():
                        log.info("client disconnected: stopped generating on tier %s", job.tier)
                        self._count("cancelled")
                        return
            result = runtime.last_result
            # Counters only: the stats route never returns request or response text.
            self.last_stats = {"tier": runtime.name, "result": counters_of(result) if result else None,
                               "prompt_cache": self._prompt_cache_stats(result)}
            self._count("completed")
            if result:
                self._count("prompt_tokens", result.prompt_tokens)
                self._count("generation_tokens", result.generation_tokens)
                log.info("tier %s: %d prompt tokens, %d from the prompt cache, %d prefilled; %d generated",
                         runtime.name, result.prompt_tokens, result.cached_tokens, result.prefill_tokens,
                         result.generation_tokens)
            job.emit("done", result)
        except ApiError as exc:
            self._count("failed")
            job.emit("error", exc)
        except ParameterError as exc:  # the runtime's own checks (an empty prompt, a bad top_p, ...)
            job.emit("error", ApiError(400, str(exc), param=exc.param))
        except (TierNotFoundError, AdmissionError) as exc:
            self._count("failed")
            job.emit("error", ApiError(400, str(exc), param="model"))
        except OutlierError as exc:
            self._count("failed")
            log.error("tier %s failed: %s", job.tier, exc)
            job.emit("error", ApiError(500, str(exc), type="server_error"))
        except Exception:
            self._count("failed")
            log.exception("generation on tier %s failed", job.tier)
            job.emit("error", ApiError(500, "The server failed while generating; see its log.",
                                       type="server_error"))


def counters_of(result: Any) -> dict[str, Any]:
    """A result's statistics without its text or tokens: what the stats route may show anyone."""
    return {k: v for k, v in result.to_dict().items() if k not in ("text", "tokens")}


def check_prompt_size(runtime: Runtime, prompt: Any, prompt_param: str) -> None:
    """Refuse a prompt that cannot fit the context window by its length alone, before tokenizing it."""
    window = runtime.manifest.generation.context_window
    if isinstance(prompt, str):
        chars = len(prompt)
    else:
        chars = sum(len(m.get("content") or "") for m in prompt if isinstance(m.get("content"), str))
    if chars > window * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"This model's maximum context length is {window} tokens, and the prompt has "
                            f"{chars} characters, more than {MAX_CHARS_PER_TOKEN} per token. Shorten the prompt.",
                       param=prompt_param, code="context_length_exceeded")


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
