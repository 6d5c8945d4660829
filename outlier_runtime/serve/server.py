"""``outlier serve``: an OpenAI-compatible HTTP API over the tiers (FastAPI + uvicorn).

The routes here parse requests and stream replies; :mod:`.model_host` keeps the loaded tiers
and runs every generation on a single worker thread (concurrent requests to a loaded tier
decode together, :mod:`.batching`);
:mod:`.openai_api` holds the wire format (request models, error bodies, reply objects);
:mod:`.guard` checks the Host and bounds the body, :mod:`.connections` bounds connections.
A client that disconnects cancels its job, and the worker stops at the next chunk.
See docs/security.md for the threat model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from outlier_runtime.core.errors import OutlierError
from outlier_runtime.serve.connections import DEFAULT_HEAD_TIMEOUT, DEFAULT_MAX_CONNECTIONS
from outlier_runtime.serve.guard import BodyGuard, GuardConfig, HostGuard
from outlier_runtime.core.memory import GB
from outlier_runtime.serve.batching import DEFAULT_MAX_BATCH, MAX_BATCH_LIMIT
from outlier_runtime.serve.content_type import JsonBodies
from outlier_runtime.serve.image_parts import check_image_urls
from outlier_runtime.serve.model_host import GenerationJob, ModelHost
from outlier_runtime.serve.models_api import model_entries
from outlier_runtime.serve.tool_calls import ToolCallSplitter
from outlier_runtime.serve.openai_api import (
    MODEL_PREFIX,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    validation_error,
)
from outlier_runtime.core.results import GenerationResult
from outlier_runtime.core.runtime import Prompt

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)

API_KEY_ENV = "OUTLIER_API_KEY"

#: Default bound on the prompt cache: KV caches kept between requests (``--prompt-cache-gb``).
DEFAULT_PROMPT_CACHE_GB = 1.0


class ServerConfigError(OutlierError):
    """The server's options are inconsistent or unsafe; nothing was started."""


@dataclass
class ServerConfig:
    """How ``outlier serve`` runs: where it listens, who may call it, and load overrides."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    force: bool = False
    #: Load overrides per tier, e.g. ``{"nano": {"model": "/path", "context_window": 512}}``.
    tier_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Paging overrides for every paged tier, e.g. ``{"k_override": 2, "cache_gb": 0}``.
    paging_overrides: dict[str, Any] = field(default_factory=dict)
    #: A tier to load at start; otherwise the first request loads its tier.
    preload: str | None = None
    #: Host header values served besides loopback names (``--allowed-host``).
    allowed_hosts: list[str] = field(default_factory=list)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Seconds a connection has to send each request head.
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    #: Body limits and timeout (see :class:`GuardConfig` for the defaults).
    guard_limits: dict[str, Any] = field(default_factory=dict)

    def guard(self) -> GuardConfig:
        return GuardConfig.for_bind(self.host, self.allowed_hosts, **self.guard_limits)
    #: Bytes of KV caches kept between requests, in GB (0: every request prefills its whole prompt).
    prompt_cache_gb: float = DEFAULT_PROMPT_CACHE_GB
    #: Whether a request may start downloading a tier's weights (else a 503 says `outlier pull TIER`).
    allow_download: bool = False
    #: GB the loaded tiers and the prompt cache may take together (None: what is available at start,
    #: less headroom). Tiers stay loaded while they fit; the least recently used idle one goes first.
    memory_gb: float | None = None
    #: Concurrent requests to the loaded tier decoded together at most (1: one at a time).
    max_batch: int = DEFAULT_MAX_BATCH
    #: Whether image_url parts may name files on the server's disk (else data: URLs only).
    allow_local_images: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise ServerConfigError(f"--max-batch {self.max_batch!r}: expected a whole number from 1 (no "
                                    f"batching) to {MAX_BATCH_LIMIT}.")

    def load_overrides(self, tier: str) -> dict[str, Any]:
        """The overrides ``load(tier, ...)`` gets: the paging knobs its loader accepts, then the tier's own."""
        from outlier_runtime.core.plugin_manager import get_registry
        from outlier_runtime.core.catalog import resolve_tier

        per_tier = self.tier_overrides.get(tier, {})
        registry = get_registry()
        loader = registry.get("loader", resolve_tier(tier, registry, per_tier).loader.name)
        accepted = set(loader.option_fields())
        shared = {key: value for key, value in self.paging_overrides.items()
                  if key in accepted or "." in key and key.split(".")[0] == loader.manifest_table}
        return {**shared, **per_tier}


def parse_tier_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["nano=/models/x", "plus.k_override=2"]`` -> ``{"nano": {"model": ...}, "plus": {"k_override": 2}}``.

    ``TIER=PATH`` serves TIER from a model directory (or repo id); ``TIER.KEY=VALUE`` sets any
    load override (``k_override``, ``context_window``, ``paging.reader``, ...), VALUE read as TOML.
    """
    from outlier_runtime.core.catalog import overrides_to_data

    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        tier, dot, key = target.partition(".")
        if not sep or not tier or (dot and not key):
            raise ServerConfigError(
                f"--tier-override {item!r}: expected TIER=PATH (e.g. nano=/models/tiny) "
                f"or TIER.KEY=VALUE (e.g. plus.k_override=2)."
            )
        if not dot:
            overrides.setdefault(tier, {})["model"] = value
            continue
        try:
            parsed: Any = tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            parsed = value  # not a TOML literal: a plain string such as a reader name
        overrides_to_data({key: parsed})  # an unknown key fails here, listing the known ones
        overrides.setdefault(tier, {})[key] = parsed
    return overrides


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if api_key:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name other than localhost may resolve to anything
    if not loopback:
        raise ServerConfigError(
            f"Refusing to listen on {host!r} without an API key: anyone who can reach it could use "
            f"the model. Pass --api-key KEY (or set {API_KEY_ENV}), or bind to 127.0.0.1."
        )


class BearerAuth:
    """ASGI middleware: with an API key set, every request needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                error = ApiError(401, "Incorrect or missing API key: send the header "
                                      "`Authorization: Bearer <key>`.", code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _events(job: GenerationJob, request: Request) -> AsyncIterator[tuple[str, Any]]:
    """The job's events until done or error; stops (and cancels the job) if the client leaves."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:  # still queued or loading: is anyone still waiting?
                if await request.is_disconnected():
                    return
                continue
            yield kind, value
            if kind in ("done", "error") or await request.is_disconnected():
                return
    finally:
        job.cancelled.set()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


async def _respond(request: Request, host: ModelHost, job: GenerationJob, reply: Reply, stream: bool) -> Response:
    host.submit(job)
    events = _events(job, request)
    # Wait for the worker to accept the prompt, so that a bad request gets a plain 400 even when streaming.
    kind, value = await anext(events, ("gone", None))
    if kind == "error":
        await events.aclose()
        raise value
    if kind == "gone":
        return Response(status_code=499)
    if job.tool_format is not None:  # the worker found the model's tool-call format
        reply.tool_calls = ToolCallSplitter(job.tool_format, job.tools)

    if stream:
        async def body() -> AsyncIterator[str]:
            async with contextlib.aclosing(events):
                opening = reply.opening()
                if opening is not None:
                    yield _sse(opening)
                async for kind, value in events:
                    if kind == "chunk":
                        piece = reply.piece(value)
                        if piece is not None:
                            yield _sse(piece)
                    elif kind == "error":
                        yield _sse(value.body())
                    elif kind == "done":
                        yield _sse(reply.closing(value))
                        if reply.include_usage:
                            yield _sse(reply.usage_chunk(value))
                        yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    result: GenerationResult | None = None
    async with contextlib.aclosing(events):
        async for kind, value in events:
            if kind == "error":
                raise value
            if kind == "done":
                result = value
    if result is None:
        return Response(status_code=499)  # the client left; nobody reads this
    return JSONResponse(reply.whole(result))


def create_app(config: ServerConfig, pipeline: Any = None) -> FastAPI:
    """The FastAPI application serving ``config``'s tiers (on rank 0 of a pipeline: ``pipeline``,
    a :class:`~outlier_runtime.serve.pipeline_work.PipelineLeader`, and no prompt cache)."""
    host = ModelHost(config.load_overrides, force=config.force,
                     prompt_cache_bytes=0 if pipeline else int(config.prompt_cache_gb * GB),
                     allow_download=config.allow_download,
                     memory_bytes=None if config.memory_gb is None else int(config.memory_gb * GB),
                     max_batch=config.max_batch, pipeline=pipeline)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, host.refresh_tiers)  # once, off the event loop
        with contextlib.suppress(NotImplementedError, AttributeError, RuntimeError):  # no SIGHUP on Windows
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, host.refresh_tiers))
        if pipeline is not None:
            pipeline.start()
        if config.preload:
            host.preload(config.preload)
        yield
        # Bounded: queued requests are cancelled and the one in progress stops at its next token.
        app.state.worker_stopped = await loop.run_in_executor(None, host.close)

    # No interactive docs: they would be reachable without the API key.
    app = FastAPI(title="outlier-runtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.host = host
    guard = config.guard()
    # Outermost last: the Host check, then the key, then the body is read (only for callers with the key).
    app.add_middleware(JsonBodies)  # inside the key check: a caller without the key learns nothing
    app.add_middleware(BodyGuard, config=guard)
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    app.add_middleware(HostGuard, config=guard)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": model_entries(host.served_tiers(), host.manifest)}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        tier = host.tier_for(model_id)  # a 404 naming the served models for any other id
        (row,) = [row for row in host.served_tiers() if row["name"] == tier]
        return model_entries([row], host.manifest)[0]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The server answers (load balancers, front ends); says which tier is loaded."""
        tier = host.loaded_tier
        return {"status": "ok", "loaded_model": MODEL_PREFIX + tier if tier else None,
                "loaded_models": [MODEL_PREFIX + name for name in host.tiers.loaded]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        tier = host.tier_for(body.model)
        check_image_urls([url for message in body.messages for url in message.image_urls()],
                         allow_local=config.allow_local_images)
        messages = [message.to_template() for message in body.messages]
        job = _job(body, tier, messages, chat=True, prompt_param="messages")
        job.tools = body.tool_definitions()
        reply = Reply(True, body.model, body.include_usage, logprobs=body.logprobs is True)
        return await _respond(request, host, job, reply, body.stream)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        tier = host.tier_for(body.model)
        job = _job(body, tier, body.text(), chat=False, prompt_param="prompt")
        reply = Reply(False, body.model, body.include_usage, logprobs=body.logprobs is not None)
        return await _respond(request, host, job, reply, body.stream)

    @app.get("/v1/outlier/stats")
    async def stats() -> dict[str, Any]:
        """Which tier is loaded, request counters, batching counters, and the last completed request's
        statistics (token counts, speeds, engine counters): never a prompt's or a reply's text."""
        tier = host.loaded_tier
        return {"object": "outlier.stats", "loaded_tier": tier,
                "loaded_model": MODEL_PREFIX + tier if tier else None, "loaded_tiers": host.tiers.loaded,
                "memory_plan": host.tiers.plan().to_dict(), "requests": dict(host.counters),
                "batching": host.batching.stats(),
                "last_request": host.last_stats}

    return app


def _job(body: ChatCompletionRequest | CompletionRequest, tier: str, prompt: Prompt, *, chat: bool,
         prompt_param: str) -> GenerationJob:
    options = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": body.stops(),
               **body.sampling()}
    if body.top_logprobs_wanted() is not None:
        options["top_logprobs"] = body.top_logprobs_wanted()
    return GenerationJob(tier, prompt, chat, prompt_param, body.token_budget(), options,
                         asyncio.get_running_loop())


def serve(config: ServerConfig) -> None:
    """Check the configuration, then serve until interrupted."""
    import mlx_lm.utils  # noqa: F401 - it lowers the open-files limit at import: let it, then raise it
    import uvicorn

    from outlier_runtime.core.plugin_manager import get_registry
    from outlier_runtime.core.catalog import resolve_tier
    from outlier_runtime.serve.pipeline_follower import follow
    from outlier_runtime.serve.pipeline_work import PipelineLeader, join_group, wants_pipeline
    from outlier_runtime.serve.connections import (
        connection_cap,
        guarded_protocol,
        install_repeat_filter,
        raise_descriptor_limit,
    )

    check_bind(config.host, config.api_key)
    get_registry()  # load the plugins now: a broken one fails here, not on the first request
    for tier in {*config.tier_overrides, *([config.preload] if config.preload else [])}:
        resolve_tier(tier, get_registry(), config.load_overrides(tier))  # fail now, not on first request
    channel = join_group() if wants_pipeline(config.paging_overrides, config.tier_overrides) else None
    if channel is not None and channel.rank != 0:
        follow(channel, config.load_overrides, config.force)  # until rank 0 shuts down
        return
    pipeline = PipelineLeader(channel, config.load_overrides, config.force) if channel is not None else None
    fd_limit = raise_descriptor_limit()
    max_connections = connection_cap(config.max_connections, fd_limit)
    log.info("serving on http://%s:%d/v1 (API key %s; at most %d connections, open-files limit %d)",
             config.host, config.port, "required" if config.api_key else "not required", max_connections, fd_limit)
    app = create_app(config, pipeline)
    uvicorn_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info",
        http=guarded_protocol(max_connections, config.head_timeout),
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,  # a request head larger than this is refused
        # On shutdown, streams still open after a few seconds are cancelled, which stops their generation.
        timeout_graceful_shutdown=5,
    )
    install_repeat_filter()  # after uvicorn configured its loggers
    server = uvicorn.Server(uvicorn_config)
    if pipeline is not None:  # a lost follower stops the server; the error is its exit line
        pipeline.on_lost = lambda error: setattr(server, "should_exit", True)
        # uvicorn raises the signal that stopped it again, to the handler it found, after a graceful
        # shutdown: rank 0 would exit 1 (Ctrl-C) or die of SIGTERM, which mlx.launch reports as a failed rank.
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, lambda signum, frame: None)
    server.run()
    if getattr(app.state, "worker_stopped", True) is False:
        os._exit(1)  # the worker is stuck (a model load): finalizing Python under it would abort the process
    if pipeline is not None and pipeline.lost is not None:
        raise pipeline.lost
