"""The server's front door (two ASGI middlewares): which Host may call, how much body it may send.

- **Host check** (DNS rebinding): a page on ``attacker.example`` that resolves its name to
  127.0.0.1 makes the browser send ``Host: attacker.example`` to this server. On a loopback
  bind only loopback names are served (``localhost``, ``127.x.y.z``, ``[::1]``, any port),
  plus the names ``--allowed-host`` adds; other names get 421, a missing Host 400.
- **Body bound**: the body is read here, before any route runs: more than ``max_body_bytes``
  is refused with 413 as soon as the count passes the limit (a too-large Content-Length at
  once, without reading), a body that takes longer than ``body_timeout`` seconds gets 408,
  and bodies being read at once share one byte budget (503 past it), so many slow uploads
  cannot hold the memory either.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from outlier_runtime.serve.openai_api import ApiError

#: A chat request's body: a long context of text, JSON-escaped, with room to spare.
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
#: Bodies being read at once, all together.
DEFAULT_BODY_BUDGET_BYTES = 64 * 2**20
DEFAULT_BODY_TIMEOUT = 30.0


def host_name(value: str) -> str:
    """The name part of a Host header value: ``[::1]:8000`` -> ``::1``, ``Localhost.:80`` -> ``localhost``."""
    value = value.strip().lower()
    if value.startswith("["):
        name = value[1:value.find("]")] if "]" in value else value[1:]
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class GuardConfig:
    """What :class:`RequestGuard` enforces."""

    #: None: any Host (a public bind with an API key and no --allowed-host).
    allowed_hosts: set[str] | None = field(default_factory=set)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_budget_bytes: int = DEFAULT_BODY_BUDGET_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    @classmethod
    def for_bind(cls, bind_host: str, extra_hosts: list[str] | tuple[str, ...] = (), **limits: Any) -> "GuardConfig":
        """Loopback names (plus ``extra_hosts``) on a loopback bind; elsewhere only ``extra_hosts``, if any."""
        extra = {host_name(h) for h in extra_hosts}
        loopback_bind = is_loopback_name(host_name(bind_host))
        allowed = extra if (loopback_bind or extra) else None
        return cls(allowed_hosts=allowed, **limits)

    def host_allowed(self, value: str | None) -> bool:
        if self.allowed_hosts is None:
            return True
        if not value:
            return False
        name = host_name(value)
        return is_loopback_name(name) or name in self.allowed_hosts


class HostGuard:
    """ASGI middleware: refuse Host values this server does not answer to (outermost)."""

    def __init__(self, app: Any, config: GuardConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            if not self.config.host_allowed(host):
                if host:
                    error = ApiError(421, f"Host {host_name(host)!r} is not served here: this server answers "
                                          f"loopback names only; start it with --allowed-host NAME to add one.",
                                     code="host_not_allowed")
                else:
                    error = ApiError(400, "Missing Host header.", code="host_not_allowed")
                await _refuse(error, scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyGuard:
    """ASGI middleware: read the whole body within its limits before any route sees it."""

    def __init__(self, app: Any, config: GuardConfig):
        self.app = app
        self.config = config
        self._buffered = 0  # body bytes held by requests being read right now

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            body = await self._read_body(headers, receive)
        except ApiError as error:
            await _refuse(error, scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects, as the app expects

        await self.app(scope, replay, send)

    async def _read_body(self, headers: Headers, receive: Any) -> bytes:
        limit = self.config.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _too_large(limit, int(declared))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.body_timeout
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise ApiError(408, f"The request body did not arrive within {self.config.body_timeout:g} "
                                        f"seconds.", code="request_timeout") from None
                if message["type"] == "http.disconnect":
                    raise ApiError(400, "The client disconnected while sending the body.")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit, None)
                if self._buffered + len(chunk) > self.config.body_budget_bytes:
                    raise ApiError(503, "The server is reading too many request bodies at once; retry shortly.",
                                   type="server_error", code="server_busy")
                self._buffered += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self._buffered -= sum(len(c) for c in chunks)


def _too_large(limit: int, declared: int | None) -> ApiError:
    got = f" (Content-Length {declared})" if declared is not None else ""
    return ApiError(413, f"The request body is larger than this server's limit of {limit} bytes{got}. "
                         f"Send a shorter prompt.", code="request_too_large")


async def _refuse(error: ApiError, scope: Any, receive: Any, send: Any) -> None:
    # Close the connection: the client may still be sending a body nobody will read.
    response = JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})
    await response(scope, receive, send)
