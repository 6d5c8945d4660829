"""The model host: the loaded Runtimes, and the worker thread that runs all model work.

Loading, switching and generating all happen on a single worker thread, and requests start
in arrival order. Loaded tiers stay loaded while the serving memory plan allows
(:mod:`.tier_pool`: least recently used unloaded first, never one serving a request; a pipeline
across ranks keeps one). Requests for a loaded tier that arrive while it generates join its
batch between decode steps (:mod:`.batching`, up to ``max_batch`` at once); with
``max_batch=1`` they run one at a time. A :class:`GenerationJob` carries one request's
generation and hands its events (started, chunk, done, error) to the event loop through an
asyncio queue; setting its ``cancelled`` flag stops the generation at the next chunk. A text
generation starts from the host's :class:`~outlier_runtime.core.prompt_cache.PrefixCache`, so a
request prefills only the tokens after the longest prefix an earlier request left in it (not
with images, on vision tiers, or across pipeline ranks: those prefill their whole prompt).

The served tiers are resolved once (off the event loop) and again only on :meth:`refresh_tiers`
(SIGHUP): reading manifests per request would stall every client behind a large one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from outlier_runtime.core.errors import AdmissionError, OutlierError, ParameterError, TierNotFoundError
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.memory import PlanLine, available_bytes, headroom_bytes
from outlier_runtime.core.params import check_generation
from outlier_runtime.core.images import has_images
from outlier_runtime.core.prompt_cache import PrefixCache
from outlier_runtime.core.results import GenerationResult
from outlier_runtime.serve.batching import BatchScheduler
from outlier_runtime.serve.openai_api import MODEL_PREFIX, ApiError
from outlier_runtime.core.protocols import PreparedPrompt
from outlier_runtime.core.runtime import Prompt, Runtime
from outlier_runtime.serve.model_thread import ModelThread
from outlier_runtime.serve.models_api import check_downloaded
from outlier_runtime.serve.tier_pool import TierPool, tier_bytes
from outlier_runtime.serve.tool_calls import check_tools

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
    #: Tool definitions for the chat template (None: none); the worker checks the model can take them
    #: and sets ``tool_format`` (serve/tool_calls.py) before the job starts.
    tools: list[dict[str, Any]] | None = None
    tool_format: Any = None

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


@dataclass
class PreparedJob:
    """A job whose tier is loaded and whose prompt is tokenized and fits: ready to generate."""

    job: GenerationJob
    runtime: Runtime
    prompt: PreparedPrompt  # token ids, and the processed images of a vision prompt
    budget: int  # tokens to generate at most

    @property
    def tokens(self) -> list[int]:
        return self.prompt.tokens


class ModelHost:
    """Holds the loaded Runtimes (a :class:`TierPool`) and runs all model work on a single worker thread."""

    def __init__(self, load_overrides: Callable[[str], dict[str, Any]] = lambda tier: {}, force: bool = False,
                 prompt_cache_bytes: int = 0, allow_download: bool = False, memory_bytes: int | None = None,
                 max_batch: int = 1, pipeline: Any = None):
        self._load_overrides = load_overrides  # tier -> keyword overrides for load()
        self._force = force
        #: Whether a request may load a tier whose weights must be downloaded first.
        self._allow_download = allow_download
        #: KV caches of earlier requests by prefix (0 bytes: every request prefills its whole prompt).
        self.prompt_cache = PrefixCache(prompt_cache_bytes)
        self._worker = ModelThread("outlier-model")  # parked, not ended, at shutdown: see model_thread.py
        # The prompt cache's budget is a line of every plan: the serving plan and a paged tier's own.
        self._reserved = ([PlanLine("prompt cache", prompt_cache_bytes, "--prompt-cache-gb, counted in full")]
                          if prompt_cache_bytes else [])
        budget, headroom = ((memory_bytes, 0) if memory_bytes is not None
                            else (available_bytes(), headroom_bytes()))  # what was free at start
        # A pipeline keeps one tier: switching unloads it on every rank at once (PipelineLeader.switch),
        # so the pool must never close a tier on its own: rank 0 alone would leave the ranks' collectives.
        footprint = ((lambda tier: (0, "a pipeline keeps one tier")) if pipeline is not None
                     else (lambda tier: tier_bytes(self.manifest(tier))))
        self.tiers = TierPool(self._load_tier, footprint, budget, headroom, self._reserved,
                              on_unload=self.prompt_cache.clear)
        self._tiers: list[dict[str, Any]] | None = None
        self._jobs: set[GenerationJob] = set()  # submitted and not finished
        self._pending: deque[GenerationJob] = deque()  # submitted and not started, in arrival order
        #: Decodes concurrent requests of the loaded tier together (at most ``max_batch``).
        self.batching = BatchScheduler(max_batch)
        self._jobs_lock = threading.Lock()
        #: Counters only: never a request's or a reply's text (anyone with the key may read them).
        self.counters = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "refused_busy": 0,
                         "prompt_tokens": 0, "generation_tokens": 0}
        self.last_stats: dict[str, Any] | None = None
        #: A PipelineLeader when this is rank 0 of a served pipeline: every load, generation and
        #: shutdown runs on every rank (serve/pipeline_work.py); None in one process.
        self.pipeline = pipeline

    @property
    def loaded_tier(self) -> str | None:
        """The most recently used loaded tier."""
        return self.tiers.most_recent

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
            self._pending.append(job)
            self.counters["requests"] += 1
        self._worker.submit(self._drain)

    def preload(self, tier: str) -> None:
        self._worker.submit(self._preload, tier)

    def close(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Cancel queued work, stop the generation in progress, free the model; False if the worker
        did not finish within ``timeout`` seconds (a load in progress cannot be interrupted)."""
        with self._jobs_lock:
            for job in self._jobs:
                job.cancelled.set()
        done = self._worker.submit(self._shutdown)
        self._worker.shutdown()
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

    def _shutdown(self) -> None:
        if self.pipeline is None or self.pipeline.shutdown():  # the followers close theirs with ours
            self._unload()
        else:
            self.tiers.abandon()  # a lost follower: closing would wait for it

    def _unload(self) -> None:
        self.tiers.close()  # each tier's prompt caches go with it

    def _preload(self, tier: str) -> None:
        try:
            self.tiers.acquire(tier)
        except Exception:  # the server keeps running; a request for the tier will say why
            log.exception("could not preload tier %s", tier)

    def _load_tier(self, tier: str) -> Runtime:
        import outlier_runtime

        if self.pipeline is not None:  # every rank closes its tier and loads this one: one tier at a time
            return self.pipeline.switch(tier, self._unload)
        return outlier_runtime.load(tier, force=self._force, reserve=self._reserved, **self._load_overrides(tier))

    def _ensure(self, tier: str, job: GenerationJob | None = None) -> Runtime:
        """The tier's runtime, loaded if needed; held for ``job`` (never unloaded under it) until it ends."""
        return self.tiers.acquire(tier, user=job)

    def _drain(self) -> None:
        """Run the queued jobs in arrival order (a batch takes the ones that can join it)."""
        while True:
            with self._jobs_lock:
                if not self._pending:
                    return  # an earlier call ran this submission's job
                job = self._pending.popleft()
            try:
                self._run(job)
            finally:
                self.release(job)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._jobs_lock:
            self.counters[name] += amount

    def _run(self, job: GenerationJob) -> None:
        if job.cancelled.is_set():
            self._count("cancelled")
            return  # the client left while the request was queued
        try:
            prepared = self._prepare(job)
            # A batch replies to every job it decodes, this one included.
            if self.pipeline is not None or not self.batching.serve(self, prepared):
                self._generate_alone(prepared)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's error reply
            self.report_error(job, exc)

    def _prepare(self, job: GenerationJob) -> PreparedJob:
        """Load the job's tier, check and tokenize its prompt, size its token budget; emits "started"."""
        if not self._allow_download and job.tier not in self.tiers.loaded:
            check_downloaded(job.tier, self.manifest(job.tier))
        runtime = self._ensure(job.tier, job)
        # Refused before a template wraps an empty prompt, and before a stored cache is taken;
        # an oversized prompt is refused by its size before it is tokenized.
        check_generation(job.prompt, **{k: v for k, v in job.options.items() if k != "stop"})
        check_prompt_size(runtime, job.prompt, job.prompt_param, job.tools)
        runtime.check_options(job.options)
        if job.tools is not None:
            job.tool_format = check_tools(job.tier, runtime.tokenizer)
        prompt = runtime.prepare(job.prompt, chat=job.chat, tools=job.tools)
        budget = token_budget(runtime, len(prompt.tokens), job.max_tokens, job.prompt_param)
        job.emit("started", len(prompt.tokens))
        return PreparedJob(job, runtime, prompt, budget)

    def _generate_alone(self, prepared: PreparedJob) -> None:
        job, runtime = prepared.job, prepared.runtime
        if has_images(job.prompt):  # the images go with the messages; no KV cache holds pixels
            generation = runtime.stream_prepared(prepared.prompt, max_tokens=prepared.budget, **job.options)
        elif self.pipeline is not None:  # every rank runs it; the prompt cache is off
            generation = self.pipeline.stream(runtime, prepared.tokens, prepared.budget, job.options,
                                              job.cancelled.is_set)
        else:
            generation = self.prompt_cache.stream(runtime, prepared.tokens, max_tokens=prepared.budget,
                                                  **job.options)
        with contextlib.closing(generation) as chunks:
            for chunk in chunks:
                job.emit("chunk", chunk)
                if job.cancelled.is_set():
                    break
        if job.cancelled.is_set():  # also when a pipeline's ranks agreed to stop before this check saw it
            log.info("client disconnected: stopped generating on tier %s", job.tier)
            self._count("cancelled")
            return
        self.finish(job, runtime, runtime.last_result)

    def next_for_batch(self, runtime: Runtime) -> PreparedJob | None:
        """The next queued job, prepared, if it can join a batch running on ``runtime``; else None and
        it stays queued (jobs start in arrival order: one that cannot join waits for the batch to end)."""
        while True:
            with self._jobs_lock:
                if not self._pending:
                    return None
                job = self._pending[0]
            if not job.cancelled.is_set() and (job.tier != runtime.name or not self.batching.accepts(runtime, job)):
                return None
            with self._jobs_lock:
                self._pending.popleft()  # still the head: only this thread takes jobs out
            if job.cancelled.is_set():
                self.drop_cancelled(job)
                continue
            try:
                return self._prepare(job)
            except Exception as exc:  # noqa: BLE001 - its error reply; the batch goes on
                self.report_error(job, exc)
                self.release(job)

    def drop_cancelled(self, job: GenerationJob) -> None:
        """A job whose client left before it finished: counted and released."""
        self._count("cancelled")
        self.release(job)

    def release(self, job: GenerationJob) -> None:
        """A job is over (replied, failed or cancelled): it no longer counts against the queue bound."""
        self.tiers.release(job)
        with self._jobs_lock:
            self._jobs.discard(job)

    def finish(self, job: GenerationJob, runtime: Runtime, result: GenerationResult | None) -> None:
        """Record a completed generation and send its result."""
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

    def report_error(self, job: GenerationJob, exc: BaseException) -> None:
        """Send ``exc`` to the job's client as an OpenAI-shaped error, counted and logged."""
        if isinstance(exc, ApiError):
            self._count("failed")
            job.emit("error", exc)
        elif isinstance(exc, ParameterError):  # the runtime's own checks (an empty prompt, a bad top_p, ...)
            job.emit("error", ApiError(400, str(exc), param=exc.param))
        elif isinstance(exc, (TierNotFoundError, AdmissionError)):
            self._count("failed")
            job.emit("error", ApiError(400, str(exc), param="model"))
        elif isinstance(exc, OutlierError):
            self._count("failed")
            log.error("tier %s failed: %s", job.tier, exc)
            job.emit("error", ApiError(500, str(exc), type="server_error"))
        else:
            self._count("failed")
            log.error("generation on tier %s failed", job.tier, exc_info=exc)
            job.emit("error", ApiError(500, "The server failed while generating; see its log.",
                                       type="server_error"))


def counters_of(result: Any) -> dict[str, Any]:
    """A result's statistics without its text or tokens: what the stats route may show anyone."""
    return {k: v for k, v in result.to_dict().items() if k not in ("text", "tokens", "logprobs")}


def check_prompt_size(runtime: Runtime, prompt: Any, prompt_param: str,
                      tools: list[dict[str, Any]] | None = None) -> None:
    """Refuse a prompt that cannot fit the context window by its length alone, before tokenizing it:
    every text the template renders counts (text parts, tool calls, tool definitions)."""
    window = runtime.manifest.generation.context_window
    chars = len(prompt) if isinstance(prompt, str) else sum(_rendered_chars(m) for m in prompt)
    chars += len(json.dumps(tools)) if tools else 0
    if chars > window * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"This model's maximum context length is {window} tokens, and the prompt has "
                            f"{chars} characters, more than {MAX_CHARS_PER_TOKEN} per token. Shorten the prompt.",
                       param=prompt_param, code="context_length_exceeded")


def _rendered_chars(message: dict[str, Any]) -> int:
    """Characters of a chat message the template renders as text (an image part counts none here:
    images have their own bounds in core/images.py)."""
    content = message.get("content") or ""
    chars = len(content) if isinstance(content, str) else sum(
        len(part.get("text") or "") for part in content if isinstance(part, dict))
    return chars + (len(json.dumps(message["tool_calls"])) if message.get("tool_calls") else 0)


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
