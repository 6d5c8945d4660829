"""`outlier serve`: the OpenAI-compatible API, driven by the official openai client and raw HTTP.

One real server (a subprocess running `outlier serve`) serves tiny models under tier names:
nano is a tiny dense llama with a 128-token context window, plus a tiny qwen3 MoE paged with
2 slots per layer and no RAM cache.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from click.testing import CliRunner

from outlier_runtime import cli

from helpers import running_server

API_KEY = "test-key"
CONTEXT_WINDOW = 128


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("serve-home")
    with running_server(tiny, home, API_KEY, CONTEXT_WINDOW) as (process, base_url, log_path):
        yield base_url


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=60)


def _stats(server: str) -> dict:
    return httpx.get(f"{server}/outlier/stats", headers=_auth(), timeout=10).json()


MESSAGES = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Say hi."}]


def test_models_lists_each_tier_as_outlier_tier(client):
    ids = [model.id for model in client.models.list()]
    assert {"outlier-nano", "outlier-plus"} <= set(ids)
    assert all(model_id.startswith("outlier-") for model_id in ids)


def test_chat_completion(client):
    reply = client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "outlier-nano"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert 0 < reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_matches_non_streaming_and_ends_with_usage(client):
    options = dict(model="outlier-nano", messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in body)


def test_completions_on_the_paged_moe_tier_and_switching_back(client, server):
    reply = client.completions.create(model="outlier-plus", prompt="def f(", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and isinstance(reply.choices[0].text, str)
    assert reply.usage.completion_tokens <= 5
    stats = _stats(server)
    assert stats["loaded_tier"] == "plus"
    engine = stats["last_request"]["result"]["engine"]
    assert engine["config"]["k_override"] == 2 and engine["config"]["cache_gb"] == 0  # the paging knobs
    assert engine["total"]["misses"] > 0

    streamed = client.completions.create(model="outlier-nano", prompt="def f(", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed)
    assert _stats(server)["loaded_tier"] == "nano"


def test_stop_sequence_ends_the_text_before_it(client):
    options = dict(model="outlier-nano", prompt="import os\n\ndef ", max_tokens=12, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(**options, stream=True)]
    full = "".join(pieces)
    # A stop string that first appears exactly where its streamed piece starts.
    offsets = [len("".join(pieces[:i])) for i in range(len(pieces))]
    index = next(i for i in range(1, len(pieces))
                 if pieces[i].strip() and "\ufffd" not in pieces[i] and full.find(pieces[i]) == offsets[i])
    for stop in (pieces[index], [pieces[index], "never-generated"]):
        reply = client.completions.create(**options, stop=stop)
        assert reply.choices[0].text == full[:offsets[index]]
        assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=10,
                                               temperature=1.0, seed=seed)
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_concurrent_requests_on_two_tiers_are_queued_not_interleaved(client):
    from concurrent.futures import ThreadPoolExecutor

    def complete(model: str) -> str:
        chunks = client.completions.create(model=model, prompt="def f(", max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    alone = {model: complete(model) for model in ("outlier-nano", "outlier-plus")}
    with ThreadPoolExecutor(4) as pool:
        models = ["outlier-nano", "outlier-plus"] * 2
        together = list(pool.map(complete, models))
    assert together == [alone[model] for model in models]


def _post(server: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, headers=_auth() if headers is None else headers, timeout=30)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_unsupported_options_are_refused_with_an_openai_error(server):
    chat = {"model": "outlier-nano", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _error(_post(server, "/chat/completions", {**chat, "n": 2}), 400)["param"] == "n"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    # nano's template has no tool-call format: tools are refused, naming why (tests/test_server_tools.py).
    refused = _error(_post(server, "/chat/completions", {**chat, "tools": tools}), 400)
    assert refused["param"] == "tools" and refused["code"] == "tools_not_supported"
    forced = _post(server, "/chat/completions", {**chat, "tool_choice": "required"})
    assert _error(forced, 400)["param"] == "tool_choice"
    assert _error(_post(server, "/chat/completions", {**chat, "frobnicate": 1}), 400)["param"] == "frobnicate"
    # An image for a text-only tier: refused naming the tier (the Vision tier takes them: test_vision_server.py).
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    error = _error(_post(server, "/chat/completions", {**chat, "messages": [image]}), 400)
    assert error["param"] == "images" and "tier 'nano' takes text only" in error["message"]
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
    assert _error(_post(server, "/chat/completions", {**chat, "messages": [audio]}), 400)["param"] == "messages.0.content"
    assert _error(_post(server, "/completions", {"model": "outlier-nano", "prompt": ["a", "b"]}), 400)
    # Harmless extras that clients send are accepted.
    assert _post(server, "/chat/completions", {**chat, "user": "u1", "metadata": {"k": "v"}}).status_code == 200


def test_unknown_model_is_not_found(server):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert _error(_post(server, "/chat/completions", body), 404)["code"] == "model_not_found"


def test_api_key_is_required(server):
    assert _error(httpx.get(f"{server}/models", timeout=10), 401)["code"] == "invalid_api_key"
    assert _error(httpx.get(f"{server}/models", headers=_auth("wrong"), timeout=10), 401)
    assert _error(_post(server, "/completions", {"model": "outlier-nano", "prompt": "x"}, headers={}), 401)


def test_prompt_and_max_tokens_must_fit_the_context_window(server):
    too_long = {"model": "outlier-nano", "prompt": "x = 1\n" * CONTEXT_WINDOW, "max_tokens": 1}
    error = _error(_post(server, "/completions", too_long), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    streamed = _post(server, "/completions", {**too_long, "stream": True})
    assert _error(streamed, 400)["code"] == "context_length_exceeded"
    too_many = {"model": "outlier-nano", "prompt": "x", "max_tokens": CONTEXT_WINDOW}
    assert _error(_post(server, "/completions", too_many), 400)["param"] == "max_tokens"


def test_client_disconnect_stops_generation(server, client):
    # Far more tokens than the tiny model makes in the time this test allows.
    body = {"model": "outlier-plus", "prompt": "def f(", "max_tokens": 20000, "stream": True}
    with httpx.stream("POST", f"{server}/completions", json=body, headers=_auth(), timeout=30) as response:
        assert response.status_code == 200
        for number, _ in enumerate(response.iter_lines()):
            if number >= 4:
                break
    started = time.monotonic()
    # Requests are queued behind the abandoned one: this returns only once it has stopped.
    client.completions.create(model="outlier-plus", prompt="x", max_tokens=2)
    assert time.monotonic() - started < 20
    assert _stats(server)["last_request"]["result"]["generation_tokens"] <= 2


def test_non_loopback_bind_without_a_key_is_refused(monkeypatch):
    monkeypatch.delenv("OUTLIER_API_KEY", raising=False)
    result = CliRunner().invoke(cli.main, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2
    assert "without an API key" in result.output


def test_an_empty_prompt_is_a_400_naming_the_prompt(server):
    error = _error(_post(server, "/completions", {"model": "outlier-nano", "prompt": "", "max_tokens": 2}), 400)
    assert error["param"] == "prompt" and error["message"].startswith("prompt: empty;")


@pytest.fixture(scope="module")
def nano_runtime(tiny, tmp_path_factory):
    """The server's nano tier loaded in this process: what the server must reproduce."""
    import outlier_runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTLIER_HOME", str(tmp_path_factory.mktemp("nano-home")))
        runtime = outlier_runtime.load("nano", model=str(tiny("llama")), force=True, context_window=CONTEXT_WINDOW)
    yield runtime
    runtime.close()


def test_a_conversation_prefills_only_each_new_turn(client, server, nano_runtime):
    messages = [{"role": "system", "content": "You review pull requests."}, {"role": "user", "content": "Read this."}]
    options = dict(model="outlier-nano", max_tokens=6, temperature=0)
    usages, replies = [], []
    for turn, follow_up in enumerate(["And this one?", "Which is better?", None]):
        extras = {"repetition_penalty": 1.3} if turn == 2 else {}  # a penalty sees the cached context too
        if turn < 2:
            reply = client.chat.completions.create(messages=messages, **options, extra_body=extras)
            text, usage = reply.choices[0].message.content, reply.usage
        else:
            chunks = list(client.chat.completions.create(messages=messages, **options, extra_body=extras,
                                                         stream=True, stream_options={"include_usage": True}))
            text, usage = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
        # The same text as a fresh generation over the whole conversation, without any cache.
        assert text == nano_runtime.generate(messages, max_tokens=6, temperature=0.0, **extras).text
        usages.append(usage)
        replies.append(text)
        if follow_up:
            messages = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    prompts = [u.prompt_tokens for u in usages]
    assert cached[0] < prompts[0]
    for turn in (1, 2):
        # Everything the previous turn's prompt held is reused: only the new turn is prefilled.
        assert prompts[turn - 1] <= cached[turn] < prompts[turn]
    last = _stats(server)["last_request"]["prompt_cache"]
    assert (last["cached_tokens"], last["prefill_tokens"]) == (cached[2], prompts[2] - cached[2])
    assert 0 < last["bytes"] <= last["max_bytes"] and last["entries"] >= 1


def test_sampling_extras_change_results_deterministically(client, server):
    def reply(temperature: float = 1.0, **extras) -> str:
        return client.chat.completions.create(model="outlier-nano", messages=MESSAGES, max_tokens=10, seed=11,
                                              temperature=temperature, extra_body=extras).choices[0].message.content

    greedy, sampled = reply(temperature=0), reply()
    assert sampled != greedy
    # Keeping only the most likely token (top_k=1, or min_p=1) samples what greedy decoding picks.
    assert reply(top_k=1) == reply(min_p=1.0) == greedy
    assert reply(top_k=40) == reply(top_k=40)
    for penalty in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        penalised = reply(temperature=0, **{penalty: 2.0})
        assert penalised != greedy and penalised == reply(temperature=0, **{penalty: 2.0}), penalty
    # Out of range: a 400 naming the field, with the bounds every entry point uses.
    chat = {"model": "outlier-nano", "messages": MESSAGES, "max_tokens": 2}
    for name, value in (("top_k", -1), ("min_p", 1.5), ("repetition_penalty", -1.0), ("presence_penalty", 3.0)):
        error = _error(_post(server, "/chat/completions", {**chat, name: value}), 400)
        assert error["param"] == name and error["message"].startswith(name) and f"got {value}" in error["message"], error


def test_models_are_retrievable_with_when_and_whether_downloaded(client, tiny):
    listed = {model.id: model for model in client.models.list()}
    nano = client.models.retrieve("outlier-nano")
    assert nano.id == "outlier-nano" and nano.object == "model" and nano.created == listed["outlier-nano"].created
    # Served from a local directory: there since its config.json was written.
    assert nano.downloaded is True and nano.created == int((tiny("llama") / "config.json").stat().st_mtime)
    code = listed["outlier-code"]  # its repo is not in this server's (empty) Hugging Face cache
    assert code.downloaded is False and code.created > 1_600_000_000  # its manifest file's time
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found" and "outlier-nano" in caught.value.message


def test_a_tier_that_is_not_downloaded_is_a_503_naming_outlier_pull(server):
    body = {"model": "outlier-code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error = _error(_post(server, "/chat/completions", body), 503)
    assert error["code"] == "model_not_downloaded" and "`outlier pull code`" in error["message"]
    assert _stats(server)["loaded_tier"] != "code"


def test_health_answers(server):
    root = server.removesuffix("/v1")
    assert httpx.get(f"{root}/health", headers=_auth(), timeout=10).json()["status"] == "ok"
    assert _error(httpx.get(f"{root}/health", timeout=10), 401)["code"] == "invalid_api_key"


def test_a_json_body_labelled_text_plain_is_read_as_json_and_a_form_is_a_415(server):
    import json

    body = {"model": "outlier-nano", "prompt": "def f(", "max_tokens": 3, "temperature": 0}
    as_json = _post(server, "/completions", body).json()["choices"][0]["text"]
    for label in ("text/plain", "text/plain; charset=utf-8", "application/json; charset=utf-8"):
        response = httpx.post(f"{server}/completions", content=json.dumps(body),
                              headers={**_auth(), "Content-Type": label}, timeout=30)
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == as_json, label
    form = httpx.post(f"{server}/completions", data={"model": "outlier-nano", "prompt": "x"}, headers=_auth(),
                      timeout=30)
    error = _error(form, 415)
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]


def test_a_repeated_prompt_reuses_the_cache_on_each_tier_and_switching_tiers_keeps_both(client, server):
    options = dict(prompt="def area(radius):\n    return", max_tokens=4, temperature=0)

    def complete(model: str):
        reply = client.completions.create(model=model, **options)
        return reply.choices[0].text, reply.usage.prompt_tokens_details.cached_tokens, reply.usage.prompt_tokens

    first = {model: complete(model) for model in ("outlier-nano", "outlier-plus")}
    # Both tiers fit: switching loaded neither again, and each kept its own caches (tests/test_tier_pool.py
    # covers a budget that holds one tier only).
    for model in ("outlier-nano", "outlier-plus", "outlier-nano"):
        again, cached, prompt = complete(model)
        assert again == first[model][0] and cached == prompt - 1  # one token is always prefilled: its logits
    assert {"nano", "plus"} <= set(_stats(server)["loaded_tiers"])


def test_a_refused_request_leaves_the_stored_cache_for_the_next(client, server):
    body = {"model": "outlier-nano", "prompt": "class Queue:\n    def put(self, item):", "max_tokens": 3,
            "temperature": 0}
    first = _post(server, "/completions", body).json()
    # The next prompt extends the stored cache, which a valid request would take as it is.
    follow = {**body, "prompt": body["prompt"] + first["choices"][0]["text"] + "\n        return"}
    assert _error(_post(server, "/completions", {**follow, "min_p": 2.0}), 400)["param"] == "min_p"
    again = _post(server, "/completions", follow).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
