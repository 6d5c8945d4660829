"""core/images.py: every way an image arrives, decoded within the stated limits, or one clear line."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from outlier_runtime import ParameterError
from outlier_runtime.core import images
from outlier_runtime.core.params import check_generation


def png_bytes(width: int = 40, height: int = 30, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=(200, 30, 60) if mode == "RGB" else 0).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refused(source, *, match: str, **kwargs) -> str:
    with pytest.raises(ParameterError, match=match) as info:
        images.load_image(source, **kwargs)
    assert info.value.param == "images" and "\n" not in str(info.value)
    return str(info.value)


def test_paths_bytes_pil_images_and_data_urls_decode_to_the_same_rgb_image(tmp_path):
    data = png_bytes(40, 30)
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    decoded = [images.load_image(source) for source in
               (str(path), path, data, Image.open(io.BytesIO(data)), data_url(data), f"file://{path}")]
    assert all(image.mode == "RGB" and image.size == (40, 30) for image in decoded)
    assert len({image.tobytes() for image in decoded}) == 1


def test_a_grey_or_transparent_image_is_converted_to_rgb():
    assert images.load_image(png_bytes(8, 8, mode="L")).mode == "RGB"
    assert images.load_image(png_bytes(8, 8, mode="RGBA")).mode == "RGB"


def test_corrupt_truncated_and_unsupported_images_are_one_line_errors(tmp_path):
    refused(png_bytes()[:60], match="corrupt or truncated")
    refused(b"not an image at all", match="not an image in a supported format")
    refused(png_bytes(fmt="TIFF"), match=r"supported format \(PNG, JPEG, WEBP, GIF, BMP\)")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    message = refused(str(text), match="not an image")
    assert "image 1" in message
    refused(str(tmp_path / "missing.png"), match="does not exist")
    refused(str(tmp_path), match="is not a file")
    refused(42, match="give a path, bytes, a PIL image or a data: URL")


def test_too_many_pixels_is_refused_from_the_header_before_decoding():
    # 20000 x 20000 = 400 MP claimed by a file of a hundred bytes: refused, nothing allocated.
    refused(png_claiming(20000, 20000), match="more than 40000000 pixels")
    # Above our bound but below Pillow's own: our check, from the header.
    refused(png_claiming(8000, 6000), match="8000x6000 is more than 40000000 pixels")
    # A real image over the bound (all black, so the file is small).
    big = io.BytesIO()
    Image.new("1", (7000, 6000)).save(big, format="PNG")
    refused(big.getvalue(), match="7000x6000 is more than")


def test_a_pil_image_over_the_pixel_bound_is_refused(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    refused(Image.new("RGB", (11, 10)), match="11x10 is more than 100 pixels")
    assert images.load_image(Image.new("RGB", (10, 10))).size == (10, 10)


def test_too_many_bytes_is_refused_for_bytes_files_and_data_urls(tmp_path, monkeypatch):
    data = png_bytes(64, 64)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", len(data) - 1)
    refused(data, match="more than 0 MiB")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    refused(str(path), match=f"has {len(data)} bytes")
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 64)
    refused(data_url(data), match="encoded; send a smaller image")


def test_bad_data_urls():
    refused("data:image/png;base64,@@@@", match="not valid base64")
    refused("data:image/png,rawbytes", match="only base64 data: URLs")
    refused("data:image/png;base64", match="needs a comma")


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://127.0.0.1:8000/cat.png",
                                 "ftp://host/cat.png", "s3://bucket/cat.png"])
def test_network_urls_are_never_fetched(url):
    assert images.url_kind(url) == "network"
    refused(url, match="network URLs are never fetched; send the image inline as a data: URL")


def test_local_paths_can_be_refused(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes())
    refused(str(path), match="local file paths are not accepted here", allow_paths=False)
    assert images.load_image(data_url(png_bytes()), allow_paths=False).size == (40, 30)


def test_too_many_images_per_call():
    with pytest.raises(ParameterError, match=r"images \(--image\): 9 images, more than 8 per call"):
        images.load_images([png_bytes()] * 9)
    with pytest.raises(ParameterError, match=r"^images \(--image\): 9 images, more than 8 per call; send fewer\.$"):
        check_generation("hi", images=["a.png"] * 9)
    assert len(images.load_images([png_bytes()] * 8)) == 8


def test_split_images_keeps_the_image_positions_and_joins_text_only_messages():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                     {"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "image", "image": b"png"},
                                     {"type": "image_url", "image_url": "data:c"}]},
    ]
    rendered, sources = images.split_images(messages)
    assert rendered[0] == {"role": "system", "content": "Be brief."}
    assert rendered[1]["content"] == [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"},
                                      {"type": "image"}]
    assert sources == ["data:a", b"png", "data:c"]
    assert images.has_images(messages) and not images.has_images(rendered[:1]) and not images.has_images("text")
    with pytest.raises(ParameterError, match="content part of type 'audio'"):
        images.split_images([{"role": "user", "content": [{"type": "audio"}]}])
