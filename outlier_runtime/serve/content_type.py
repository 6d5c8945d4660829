"""Request bodies are JSON whatever their label says, as mlx_lm.server reads them.

Some clients (a few chat front ends, scripts) send a JSON body as ``text/plain``; it is read as
JSON, like a body with no content type at all. A body labelled as anything else (a form,
multipart, XML) gets a 415 saying to send JSON, instead of a validation error about its fields.

Not from a browser page, though: ``text/plain`` is the one body type a page on any site may post
to 127.0.0.1 without a CORS preflight, and the Host check does not stop it (the Host is ours).
Browsers always name the page's origin on such a request (``Origin``), programs do not: a
``text/plain`` body that comes with an ``Origin`` header is refused like any other non-JSON type.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from outlier_runtime.serve.openai_api import ApiError

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class JsonBodies:
    """ASGI middleware: ``text/plain`` bodies are relabelled JSON; other non-JSON types get a 415."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS:
            label = Headers(scope=scope).get("content-type")
            media = (label or "").split(";")[0].strip().lower()
            if media == "text/plain" and Headers(scope=scope).get("origin") is None:
                headers = [(name, value) for name, value in scope["headers"] if name.lower() != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            elif label is not None and not _is_json(media):
                error = ApiError(415, f"Unsupported content type {label!r}: send the request body as JSON "
                                      f"(Content-Type: application/json).", code="unsupported_media_type")
                await JSONResponse(error.body(), status_code=415)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_json(media: str) -> bool:
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))
