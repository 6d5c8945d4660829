"""The server's policy for ``image_url`` content parts, checked before a request is queued.

``data:`` URLs are decoded (by core/images.py, within its limits); a local path only when the
server was started with ``--allow-local-images`` (it reads the server's own disk, which a
remote caller should not name); any other URL (http, https, ftp, ...) is refused, never fetched.
"""

from __future__ import annotations

from typing import Sequence

from outlier_runtime.core.images import MAX_IMAGES, network_url_message, url_kind
from outlier_runtime.serve.openai_api import ApiError


def check_image_urls(urls: Sequence[str], *, allow_local: bool) -> None:
    """Raise a 400 naming the first image_url this server will not take."""
    if len(urls) > MAX_IMAGES:
        raise ApiError(400, f"images: {len(urls)} images, more than {MAX_IMAGES} per request; send fewer.",
                       param="messages", code="too_many_images")
    for number, url in enumerate(urls, 1):
        kind = url_kind(url)
        which = f"image {number}"
        if kind == "network":
            raise ApiError(400, network_url_message(which) + ".", param="messages", code="image_url_not_allowed")
        if kind == "path" and not allow_local:
            raise ApiError(400, f"images: {which}: local file paths are refused by this server (start it with "
                                f"--allow-local-images to allow them); send the image as a data: URL "
                                f"(data:image/png;base64,...).", param="messages", code="image_url_not_allowed")
