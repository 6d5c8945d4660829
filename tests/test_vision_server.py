"""`outlier serve` with the Vision tier: OpenAI image_url parts, through the official openai client.

One real server (a subprocess on a loopback port) serves the tiny VLM as `vision` next to the
usual tiny nano. data: URLs are taken; network URLs never (400); local paths only with
--allow-local-images (a second server checks that).
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import outlier_runtime

from helpers import running_server

API_KEY = "test-key"
PROMPT = "What is in this picture?"


def png(seed: int = 0, size=(64, 48)) -> bytes:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(*urls: str, text: str = PROMPT) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(tiny, tiny_vlm_dir, tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("serve-home")
    with running_server(tiny, home, API_KEY, 128, ["--tier-override", f"vision={tiny_vlm_dir}"]) as (_, url, _log):
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(tiny_vlm_dir, tmp_path_factory) -> str:
    """The Python API's greedy reply to the same image and prompt."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTLIER_HOME", str(tmp_path_factory.mktemp("outlier-home")))
        with outlier_runtime.load("vision", model=str(tiny_vlm_dir), force=True) as runtime:
            return runtime.generate(image_message(data_url(png())), max_tokens=8, temperature=0).text


def test_the_openai_client_gets_an_answer_about_an_image(client, expected):
    reply = client.chat.completions.create(model="outlier-vision", messages=image_message(data_url(png())),
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected and expected
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 20  # text + image tokens


def test_streaming_an_image_reply_gives_the_same_text(client, expected):
    chunks = client.chat.completions.create(model="outlier-vision", messages=image_message(data_url(png())),
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_text_only_requests_still_work_on_the_vision_tier(client):
    reply = client.chat.completions.create(model="outlier-vision", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens >= 1


def bad_request(client, messages, model="outlier-vision") -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    return info.value


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://127.0.0.1:1/cat.png"])
def test_a_network_url_is_a_400_and_never_fetched(client, url):
    error = bad_request(client, image_message(url))
    assert "network URLs are never fetched" in error.message and error.body["param"] == "messages"


def test_a_local_path_is_refused_without_the_flag(client, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(png())
    error = bad_request(client, image_message(str(path)))
    assert "--allow-local-images" in error.message


@pytest.mark.parametrize("case, message", [
    ("corrupt", "corrupt or truncated"),
    ("unsupported", "not an image in a supported format"),
    ("too_many_pixels", "7000x6000 is more than 40000000 pixels"),
    ("not_base64", "not valid base64"),
])
def test_bad_images_are_400s_naming_the_problem(client, case, message):
    big = io.BytesIO()
    Image.new("1", (7000, 6000)).save(big, format="PNG")  # all black: a small file, too many pixels
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    url = {"corrupt": data_url(png()[:100]), "unsupported": data_url(tiff.getvalue()),
           "too_many_pixels": data_url(big.getvalue()), "not_base64": "data:image/png;base64,%%%"}[case]
    error = bad_request(client, image_message(url))
    assert message in error.message and error.body["param"] == "images"


def test_too_many_images_is_a_400(client):
    error = bad_request(client, image_message(*[data_url(png())] * 9))
    assert "9 images, more than 8 per request" in error.message


def test_too_many_bytes_is_bounded_by_the_request_body(server):
    # The default body bound (4 MiB) stops an oversized data: URL before anything is decoded.
    body = {"model": "outlier-vision", "messages": image_message(data_url(b"\0" * (5 * 2**20)))}
    response = httpx.post(f"{server}/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 413


def test_an_image_to_a_text_only_tier_names_the_tier(client):
    error = bad_request(client, image_message(data_url(png())), model="outlier-nano")
    assert "tier 'nano' takes text only" in error.message


def test_the_server_keeps_answering_after_bad_images(client, expected):
    bad_request(client, image_message(data_url(b"garbage")))
    reply = client.chat.completions.create(model="outlier-vision", messages=image_message(data_url(png())),
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected


def test_local_paths_are_taken_with_allow_local_images(tiny, tiny_vlm_dir, tmp_path, expected):
    path = tmp_path / "cat.png"
    path.write_bytes(png())
    args = ["--tier-override", f"vision={tiny_vlm_dir}", "--allow-local-images"]
    home = tmp_path / "home"
    home.mkdir()
    with running_server(tiny, home, API_KEY, 128, args) as (_, url, _log):
        client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="outlier-vision", messages=image_message(str(path)),
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == expected
        error = bad_request(client, image_message("https://example.com/cat.png"))
        assert "never fetched" in error.message


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_on_the_vision_tier_are_a_400_before_anything_streams(client, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        reply = client.chat.completions.create(model="outlier-vision", messages=image_message(data_url(png())),
                                               max_tokens=2, logprobs=True, top_logprobs=1, stream=stream)
        list(reply) if stream else None
    assert caught.value.status_code == 400 and "vision model" in str(caught.value)
    assert caught.value.body["param"] == "logprobs"
