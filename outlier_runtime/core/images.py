"""Images for vision tiers: decoded from paths, bytes, PIL images or ``data:`` URLs, within limits.

Every entry (Python, the CLI's ``--image``, the server's ``image_url`` parts) decodes images
here, so the limits and messages are one set. A bad image is a one-line ``ParameterError``
(param ``images``) naming which image and what to do; the server answers it with a 400.

Limits (per call): at most ``MAX_IMAGES`` images, each at most ``MAX_IMAGE_BYTES`` encoded and
``MAX_IMAGE_PIXELS`` pixels. The pixel bound is checked from the header, before any pixel is
decoded, and Pillow's own decompression-bomb guard is turned into an error as well, so a small
file that claims a huge image costs nothing. A network URL is never fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence, Union
from urllib.parse import unquote, urlparse

from outlier_runtime.core.errors import ParameterError

#: Images per call (a request, a ``generate`` call, a command line).
MAX_IMAGES = 8
#: Encoded bytes per image (a file, a ``bytes`` value, a decoded ``data:`` URL).
MAX_IMAGE_BYTES = 20 * 2**20
#: Pixels per image (width x height): 40 megapixels, above any camera photo's 24-33 MP.
MAX_IMAGE_PIXELS = 40_000_000
#: Formats accepted (Pillow's names); others are refused even when Pillow could read them.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

ImageInput = Union[str, Path, bytes, bytearray, Any]  # Any: a PIL.Image.Image

#: Content-part types that carry an image: OpenAI's ``image_url``, and the ``image`` /
#: ``input_image`` shapes of Hugging Face chat templates and OpenAI's newer API.
IMAGE_PART_TYPES = ("image_url", "image", "input_image")


def _error(which: str, what: str) -> ParameterError:
    return ParameterError(f"images: {which}: {what}.", param="images")


def url_kind(url: str) -> str:
    """``"data"`` (an inline ``data:`` URL), ``"path"`` (a local file, plain or ``file://``) or
    ``"network"`` (anything with another scheme: never fetched)."""
    if url.startswith("data:"):
        return "data"
    scheme = urlparse(url).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # a Windows drive
        return "path"
    return "network"


def network_url_message(which: str) -> str:
    return (f"images: {which}: network URLs are never fetched; send the image inline as a "
            f"data: URL (data:image/png;base64,...)")


def _path_of(url: str) -> Path:
    parsed = urlparse(url)
    return Path(unquote(parsed.path)) if parsed.scheme.lower() == "file" else Path(url)


def _data_url_bytes(url: str, which: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise _error(which, "a data: URL needs a comma before its payload (data:image/png;base64,...)")
    if not header.endswith(";base64"):
        raise _error(which, "only base64 data: URLs are accepted (data:image/png;base64,...)")
    # Bounded before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise _error(which, f"more than {MAX_IMAGE_BYTES // 2**20} MiB encoded; send a smaller image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _error(which, "the data: URL's payload is not valid base64") from None


def _file_bytes(path: Path, which: str) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise _error(which, f"{path} is not a file")
        if size > MAX_IMAGE_BYTES:
            raise _error(which, f"{path} has {size} bytes, more than {MAX_IMAGE_BYTES // 2**20} MiB; "
                                f"send a smaller image")
        return path.read_bytes()
    except FileNotFoundError:
        raise _error(which, f"{path} does not exist; check the path") from None
    except OSError as exc:
        raise _error(which, f"cannot read {path}: {exc.strerror or exc}") from None


def _decode(data: bytes, which: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise _error(which, f"{len(data)} bytes, more than {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own pixel bound and raises above twice it: both are errors here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_pixels(image, which)
            image.load()
    except UnidentifiedImageError:
        raise _error(which, f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _error(which, f"more than {MAX_IMAGE_PIXELS} pixels; send a smaller image") from None
    except ParameterError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise _error(which, f"the image data is corrupt or truncated ({exc})") from None
    return image


def _check_pixels(image: Any, which: str) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise _error(which, f"{width}x{height} is more than {MAX_IMAGE_PIXELS} pixels; send a smaller image")
    if width < 1 or height < 1:
        raise _error(which, f"{width}x{height} has no pixels")


def load_image(source: ImageInput, which: str = "image 1", *, allow_paths: bool = True) -> Any:
    """One image as a decoded RGB ``PIL.Image.Image``, within the limits.

    ``source``: a PIL image, encoded bytes, a local path, or a ``data:`` URL (also ``file://``).
    ``allow_paths=False`` refuses local files (the server, unless started to allow them).
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        _check_pixels(source, which)
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), which)
    elif isinstance(source, (str, Path)):
        text = str(source)
        kind = url_kind(text) if isinstance(source, str) else "path"
        if kind == "network":
            raise ParameterError(network_url_message(which) + ".", param="images")
        if kind == "data":
            image = _decode(_data_url_bytes(text, which), which)
        elif not allow_paths:
            raise _error(which, "local file paths are not accepted here (the server needs "
                                "--allow-local-images); send the image as a data: URL")
        else:
            image = _decode(_file_bytes(_path_of(text), which), which)
    else:
        raise _error(which, f"got {type(source).__name__}; give a path, bytes, a PIL image or a data: URL")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_tier_takes_images(manifest: Any) -> None:
    """Refuse images for a tier whose manifest does not declare image input (before loading it)."""
    if not manifest.model.image_input:
        raise ParameterError(
            f"images: tier {manifest.name!r} takes text only (its manifest sets no `[model] image_input`); "
            f"send images to a tier with image input, such as `vision`.", param="images")


def images_for_tier(tier: str, overrides: dict[str, Any], sources: Sequence[ImageInput]) -> list[Any]:
    """The images decoded for ``tier`` before it loads (the CLI): a text-only tier, a missing
    file or a bad image costs no load time."""
    from outlier_runtime.core.catalog import resolve_tier
    from outlier_runtime.core.plugin_manager import get_registry

    check_tier_takes_images(resolve_tier(tier, get_registry(), overrides))
    return load_images(sources)


def load_images(sources: Sequence[ImageInput], *, allow_paths: bool = True) -> list[Any]:
    """Every image decoded (see :func:`load_image`), at most ``MAX_IMAGES``."""
    sources = list(sources)
    if len(sources) > MAX_IMAGES:
        raise ParameterError(f"images (--image): {len(sources)} images, more than {MAX_IMAGES} per call; "
                             f"send fewer.", param="images")
    return [load_image(source, _label(source, i), allow_paths=allow_paths) for i, source in enumerate(sources, 1)]


def _label(source: Any, number: int) -> str:
    """``image N``, with the file's name when the image is a local path (never a data: URL's bytes)."""
    if isinstance(source, Path) or (isinstance(source, str) and url_kind(source) == "path" and len(source) < 512):
        return f"image {number} ({source})"
    return f"image {number}"


def part_source(part: dict[str, Any]) -> Any:
    """The image a content part carries: OpenAI's ``{"image_url": {"url": ...}}`` (or a bare
    string), or ``{"image": ...}`` / ``{"image_url": ...}`` holding a path, bytes or PIL image."""
    value = part.get("image_url", part.get("image"))
    if isinstance(value, dict):
        value = value.get("url")
    return value


def split_images(messages: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Chat messages with their image parts replaced by ``{"type": "image"}`` markers (where the
    template puts the image), and the images' sources in order. A message whose parts are all
    text gets its text joined, so text-only templates see a plain string."""
    rendered: list[dict[str, Any]] = []
    sources: list[Any] = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(dict(message))
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in IMAGE_PART_TYPES:
                sources.append(part_source(part))
                parts.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ParameterError(
                    f"messages: a content part of type {kind!r}; use text parts "
                    f'({{"type": "text", "text": ...}}) or image parts ({{"type": "image_url", ...}}).',
                    param="messages")
        if all(p["type"] == "text" for p in parts):
            rendered.append({**message, "content": "".join(p["text"] for p in parts)})
        else:
            rendered.append({**message, "content": parts})
    return rendered, sources


def has_images(prompt: Any) -> bool:
    """Whether chat messages carry an image content part."""
    if isinstance(prompt, str) or prompt is None:
        return False
    return any(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES
               for message in prompt if isinstance(message, dict) and isinstance(message.get("content"), list)
               for part in message["content"])
