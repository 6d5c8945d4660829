"""`outlier serve` decodes concurrent requests together: N clients on loopback, each reply equal to
stock mlx-lm's batched output for the same batch, the stats route counting the shared steps.

The server runs in-process (uvicorn in a thread) so that the test can hold the model worker
while the clients' requests queue: they then start as one batch, the batch stock
``batch_generate`` makes of the same prompts.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx_lm
import openai
import pytest
import uvicorn
from mlx_lm.generate import batch_generate, stream_generate

from outlier_runtime.core.batch_generation import generator_sizes
from outlier_runtime.serve.batching import MAX_BATCH_LIMIT
from outlier_runtime.serve.server import ServerConfig, ServerConfigError, create_app

from helpers import free_port

PROMPTS = ["def f(", "import os\n\ndef walk(path):\n", "class Stack:\n    def push(self, x):", "x = [i * i for i in"]
BUDGETS = [8, 12, 6, 10]
#: Seconds any wait in these tests may take before it fails (a hung worker must not hang the suite).
DEADLINE = 60


@pytest.fixture
def served(request, tiny):
    """(base_url, model host) of an in-process server: tier plus is a tiny qwen3 MoE paged with 2 slots
    per layer and no RAM cache, loaded at start; ``--max-batch`` is the test's parameter."""
    yield from _in_process(preload="plus", max_batch=request.param,
                           tier_overrides={"plus": {"model": str(tiny("qwen3_moe"))}},
                           paging_overrides={"k_override": 2, "cache_gb": 0})


def _in_process(**config):
    """Serve ``ServerConfig(**config)`` from a thread until the fixture ends: (base_url, model host)."""
    port = free_port()
    app = create_app(ServerConfig(port=port, force=True, **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    host = app.state.host
    _wait(lambda: server.started and host.loaded_tier == config["preload"],
          f"the server to start and load {config['preload']}")
    yield f"http://127.0.0.1:{port}/v1", host
    server.should_exit = True
    thread.join(DEADLINE)


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"waited {DEADLINE} s for {what}"
        time.sleep(0.02)


def _complete(base_url: str, prompt: str, max_tokens: int, stream: bool, **options) -> tuple[str, int | None]:
    """One client's request: (text, completion tokens; None when streamed)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=DEADLINE)
    reply = client.completions.create(model="outlier-plus", prompt=prompt, max_tokens=max_tokens, stream=stream,
                                      **options)
    if stream:
        return "".join(chunk.choices[0].text for chunk in reply), None
    return reply.choices[0].text, reply.usage.completion_tokens


def _together(base_url: str, host, requests: list[tuple[str, int, bool, dict]]) -> list[tuple[str, int | None]]:
    """Send ``requests`` from concurrent clients while the model worker is held, so all of them are
    queued, in this order, when it starts on them; their replies, in order."""
    gate = threading.Event()
    host._worker.submit(gate.wait, DEADLINE)  # the worker runs jobs in order: it now waits for the gate
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = []
        for prompt, n, stream, options in requests:
            queued = host.counters["requests"]
            futures.append(pool.submit(_complete, base_url, prompt, n, stream, **options))
            _wait(lambda: host.counters["requests"] == queued + 1, "the request to be queued")
        gate.set()
        return [future.result(timeout=DEADLINE) for future in futures]


def _stats(base_url: str) -> dict:
    return httpx.get(f"{base_url}/outlier/stats", timeout=10).json()


def _streamed_text(tokenizer, tokens: list[int]) -> str:
    detokenizer = tokenizer.detokenizer
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


@pytest.mark.parametrize("served", [8], indirect=True)
def test_concurrent_clients_are_decoded_together_as_stock_batch_generate(served, tiny):
    base_url, host = served
    replies = _together(base_url, host, [(p, n, i % 2 == 0, {"temperature": 0})
                                         for i, (p, n) in enumerate(zip(PROMPTS, BUDGETS))])
    model, tokenizer = mlx_lm.load(str(tiny("qwen3_moe")))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = batch_generate(model, tokenizer, prompts, max_tokens=BUDGETS, return_token_ids=True,
                              **generator_sizes(8)).token_ids
    for (text, completion_tokens), tokens in zip(replies, expected):
        assert text == _streamed_text(tokenizer, tokens)
        assert completion_tokens in (None, len(tokens))
    batching = _stats(base_url)["batching"]
    assert batching["largest_batch"] == len(PROMPTS) and batching["batched_requests"] == len(PROMPTS)
    # Every step decoded at least two requests until all but the longest had finished.
    assert batching["batched_steps"] >= sorted(BUDGETS)[-2] - 1
    assert batching["batches"] == 1 and batching["unbatched_requests"] == 0


@pytest.mark.parametrize("served", [8], indirect=True)
def test_a_seeded_sampling_request_runs_alone_in_its_turn(served):
    base_url, host = served
    seeded = ("def g(", 8, False, {"temperature": 1.0, "seed": 5})
    replies = _together(base_url, host, [(PROMPTS[0], 6, False, {"temperature": 0}), seeded,
                                         (PROMPTS[1], 6, True, {"temperature": 0})])
    assert replies[1] == _complete(base_url, seeded[0], seeded[1], False, **seeded[3])  # reproducible
    batching = _stats(base_url)["batching"]
    # The greedy request before it could not wait for it, nor the one after it jump the queue.
    assert batching["unbatched_requests"] == 2 and batching["batches"] == 2 and batching["largest_batch"] == 1


@pytest.mark.parametrize("served", [8], indirect=True)
def test_a_client_that_leaves_is_dropped_from_the_batch_and_the_others_finish(served):
    base_url, host = served
    body = {"model": "outlier-plus", "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=DEADLINE) as http:
        with http.stream("POST", f"{base_url}/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it is decoding
            text, completion_tokens = _complete(base_url, PROMPTS[1], 10, False, temperature=0)
            assert 0 < completion_tokens <= 10 and text  # decoded beside the long one, and done first
            assert _stats(base_url)["batching"]["largest_batch"] == 2
        # The long request's client left: its sequence leaves the batch at the next step.
    _wait(lambda: host.counters["cancelled"] == 1 and not host._jobs, "the abandoned request to be dropped")
    assert host.counters["completed"] == 1
    assert _complete(base_url, PROMPTS[2], 4, False, temperature=0)[1] == 4  # the worker is free again


@pytest.mark.parametrize("served", [1], indirect=True)
def test_max_batch_one_decodes_one_request_at_a_time_as_stock(served, tiny):
    base_url, host = served
    replies = _together(base_url, host, [(p, n, False, {"temperature": 0}) for p, n in zip(PROMPTS, BUDGETS)])
    model, tokenizer = mlx_lm.load(str(tiny("qwen3_moe")))
    for (text, _), prompt, n in zip(replies, PROMPTS, BUDGETS):
        assert text == "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=n))
    batching = _stats(base_url)["batching"]
    assert batching["batches"] == batching["largest_batch"] == 0
    assert batching["unbatched_requests"] == len(PROMPTS)


def test_max_batch_is_checked():
    with pytest.raises(ServerConfigError, match="--max-batch 0: expected a whole number from 1"):
        ServerConfig(max_batch=0)
    from click.testing import CliRunner

    from outlier_runtime import cli

    result = CliRunner().invoke(cli.main, ["serve", "--max-batch", "65"])
    assert result.exit_code == 2 and "--max-batch" in result.output and "65" in result.output
    flag = next(p for p in cli.serve.params if p.name == "max_batch")
    assert flag.default == ServerConfig().max_batch and flag.type.max == MAX_BATCH_LIMIT


@pytest.fixture
def served_tools(tiny_cache):
    """(base_url, model host) of an in-process server whose tier lite is the tiny tool-calling llama."""
    from outlier_runtime.testing.tool_model import tool_calling_model

    yield from _in_process(preload="lite", max_batch=8,
                           tier_overrides={"lite": {"model": str(tool_calling_model(cache_dir=tiny_cache))}})


def test_tool_calls_are_parsed_from_batched_replies_and_logprobs_requests_run_alone(served_tools):
    from outlier_runtime.testing.tool_model import FORCED_CALL

    base_url, host = served_tools
    tools = [{"type": "function", "function": {"name": FORCED_CALL["name"], "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=DEADLINE)

    def call(stream: bool, logprobs: bool = False):
        reply = client.chat.completions.create(model="outlier-lite", messages=ask, tools=tools, temperature=0,
                                               max_tokens=16, stream=stream, logprobs=logprobs or None)
        if not stream:
            return reply.choices[0].finish_reason, reply.choices[0].message.tool_calls, reply.choices[0].logprobs
        finish, names = None, ""
        for chunk in reply:
            finish = chunk.choices[0].finish_reason or finish
            names += "".join(c.function.name or "" for c in chunk.choices[0].delta.tool_calls or [])
        return finish, names, None

    gate = threading.Event()
    host._worker.submit(gate.wait, DEADLINE)  # hold the worker until every request is queued
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for stream, logprobs in [(False, False), (True, False), (False, False), (False, True)]:
            queued = host.counters["requests"]
            futures.append(pool.submit(call, stream, logprobs))
            _wait(lambda: host.counters["requests"] == queued + 1, "the request to be queued")
        gate.set()
        (f1, calls1, _), (f2, names2, _), (f3, calls3, _), (f4, calls4, logprobs4) = (
            f.result(timeout=DEADLINE) for f in futures)
    assert f1 == f2 == f3 == f4 == "tool_calls"
    for calls in (calls1, calls3, calls4):
        (one,) = calls
        assert one.function.name == FORCED_CALL["name"]
    assert names2 == FORCED_CALL["name"]
    assert logprobs4 is not None and logprobs4.content  # logprobs: generated alone, values present
    batching = _stats(base_url)["batching"]
    assert batching["largest_batch"] == 3 and batching["unbatched_requests"] == 1
