"""Log probabilities (`logprobs` / `top_logprobs`): the runtime's values are stock mlx-lm's, and
the server returns them in OpenAI's shapes (chat: `logprobs.content`; completions: the legacy form),
streamed too, with OpenAI's bounds."""

from __future__ import annotations

import math

import httpx
import mlx.core as mx
import openai
import pytest

from helpers import running_server

API_KEY = "logprobs-key"
MESSAGES = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("serve-logprobs")
    with running_server(tiny, home, API_KEY, 256) as (process, base_url, log_path):
        yield base_url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stock(tiny):
    import mlx_lm

    return mlx_lm.load(str(tiny("llama")))


def _stock_steps(stock, prompt_tokens: list[int], max_tokens: int, top: int) -> list[tuple[int, float, list]]:
    """Stock mlx-lm's greedy steps: (token, its log-softmax value, the top alternatives)."""
    from mlx_lm import stream_generate

    model, tokenizer = stock
    steps = []
    for response in stream_generate(model, tokenizer, mx.array(prompt_tokens), max_tokens=max_tokens):
        if response.finish_reason == "stop":
            break  # the end-of-sequence token is not part of the reply
        row = response.logprobs
        # log_softmax of stock's logits, recomputed here, not read from our code.
        order = mx.argsort(-row)[:top].tolist()
        steps.append((response.token, row[response.token].item(), [(t, row[t].item()) for t in order]))
    return steps


def test_runtime_logprobs_equal_stock_mlx_lm(nano, stock):
    tokens = nano.encode("def add(a, b):", chat=False)
    result = nano.generate("def add(a, b):", chat=False, max_tokens=8, temperature=0, top_logprobs=3)
    expected = _stock_steps(stock, tokens, 8, 3)
    assert [e.token for e in result.logprobs] == result.tokens == [t for t, _, _ in expected]
    for entry, (token, value, top) in zip(result.logprobs, expected):
        assert entry.logprob == value  # the same computation: bit for bit
        assert [(alt.token, alt.logprob) for alt in entry.top] == top
        assert entry.logprob <= 0 and entry.top[0].logprob >= entry.logprob
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.text
    # Without the option nothing is computed.
    assert nano.generate("def add(a, b):", chat=False, max_tokens=2, temperature=0).logprobs is None


def test_chat_logprobs_in_openai_shape_equal_stock(client, stock):
    reply = client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=4)
    content = reply.choices[0].logprobs.content
    _, tokenizer = stock
    prompt = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    expected = _stock_steps(stock, prompt, 8, 4)
    assert len(content) == len(expected) == reply.usage.completion_tokens
    # The tokens' bytes spell the reply (a token may hold part of a UTF-8 character).
    spelled = b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace")
    assert spelled == reply.choices[0].message.content
    for entry, (token, value, top) in zip(content, expected):
        assert entry.logprob == pytest.approx(value, abs=1e-6)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-6)
        assert len(entry.top_logprobs) == 4 and entry.top_logprobs[0].logprob >= entry.logprob
    assert 0 < sum(math.exp(alt.logprob) for alt in content[0].top_logprobs) <= 1 + 1e-6
    # logprobs without top_logprobs: the chosen tokens only.
    plain = client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=8, temperature=0,
                                           logprobs=True)
    assert [e.logprob for e in plain.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_streamed_chat_logprobs_match_the_whole_reply(client):
    whole = client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    streamed = []
    for chunk in client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=8,
                                                temperature=0, logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content],
                                                          abs=1e-5)


def test_completions_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(model="outlier-nano", prompt="def add(a, b):", max_tokens=6, temperature=0,
                                      logprobs=2)
    logprobs = reply.choices[0].logprobs
    # Each token's text (a token holding part of a UTF-8 character shows U+FFFD, as its decoded bytes do).
    joined = "".join(logprobs.tokens)
    assert joined == reply.choices[0].text or "\ufffd" in joined and len(joined) >= len(reply.choices[0].text)
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == reply.usage.completion_tokens
    assert all(len(top) <= 2 and max(top.values()) >= lp for top, lp in zip(logprobs.top_logprobs,
                                                                             logprobs.token_logprobs))
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert logprobs.text_offset == offsets
    streamed_tokens, streamed_offsets = [], []
    for chunk in client.completions.create(model="outlier-nano", prompt="def add(a, b):", max_tokens=6,
                                           temperature=0, logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed_tokens += chunk.choices[0].logprobs.tokens
            streamed_offsets += chunk.choices[0].logprobs.text_offset
    assert streamed_tokens == logprobs.tokens and streamed_offsets == offsets


@pytest.mark.parametrize("path, change, param", [
    ("/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/completions", {"logprobs": 6}, "logprobs"),
])
def test_logprob_bounds_are_openais(server, path, change, param):
    body = ({"messages": MESSAGES} if path == "/chat/completions" else {"prompt": "x"})
    response = httpx.post(f"{server}{path}", json={"model": "outlier-nano", "max_tokens": 2, **body, **change},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_stats_route_never_shows_token_text(server, client):
    client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=4, logprobs=True,
                                   top_logprobs=2)
    stats = httpx.get(f"{server}/outlier/stats", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()
    assert "logprobs" not in stats["last_request"]["result"] and "text" not in stats["last_request"]["result"]
