"""Load on the real `outlier serve`: 16 concurrent clients for a bounded time, two tiers, bad requests.

Not in the default run (it is marked ``soak``); run it with ``python -m pytest -m soak -s
tests/test_server_load.py``. One server subprocess serves a tiny dense llama as nano (128-token
context window) and a tiny qwen3 MoE as plus, paged with two slots per layer and no RAM
cache. The clients mix streaming and non-streaming chat and text completions on both tiers
(every switch unloads one tier and loads the other) with requests that must be refused, and
clients that leave mid-stream. Every answer must carry the right status and an OpenAI-style
body, no connection may fail, and the server's RSS must stay bounded; the figures are printed
as one JSON line.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest

from helpers import running_server

API_KEY = "soak-key"
CONTEXT_WINDOW = 128
CLIENTS = 16
#: New requests start only within this many seconds (those in flight then are finished).
DURATION_SECONDS = 40
MAX_REQUESTS = 2000
#: RSS may grow this much from the warm-up sample to the last one (two tiers, loaded in turn).
MAX_RSS_GROWTH_BYTES = 150 * 2**20
MAX_RSS_BYTES = 2 * 2**30

MESSAGES = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Write a loop."}]
PROMPTS = ["def f(", "import os\n\ndef walk(path):\n", "class Queue:\n", "x = [i for i in"]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-load-home")
    with running_server(tiny, home, API_KEY, CONTEXT_WINDOW) as (process, base_url, log_path):
        yield process, base_url, log_path


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- requests
# Each kind: (path, body, headers or None for the right key, expected status, check on the error).

def _good(kind: str, rng: random.Random) -> tuple[str, dict]:
    tier = rng.choice(["outlier-nano", "outlier-plus"])
    max_tokens = rng.randint(2, 12)
    common = {"model": tier, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}
    if kind.endswith("stream"):
        common.update(stream=True, stream_options={"include_usage": True})
    if kind.startswith("chat"):
        return "/chat/completions", {**common, "messages": MESSAGES}
    return "/completions", {**common, "prompt": rng.choice(PROMPTS)}


GOOD = ["chat", "chat-stream", "text", "text-stream"]
BAD = {
    # kind: (path, body, headers, status, expected error code or param)
    "n=2": ("/chat/completions", {"model": "outlier-nano", "messages": MESSAGES, "max_tokens": 2, "n": 2},
            None, 400, ("param", "n")),
    "too-long": ("/completions", {"model": "outlier-nano", "prompt": "x = 1\n" * CONTEXT_WINDOW, "max_tokens": 1},
                 None, 400, ("code", "context_length_exceeded")),
    "too-long-stream": ("/completions", {"model": "outlier-nano", "prompt": "x = 1\n" * CONTEXT_WINDOW,
                                         "max_tokens": 1, "stream": True},
                        None, 400, ("code", "context_length_exceeded")),
    "wrong-key": ("/chat/completions", {"model": "outlier-plus", "messages": MESSAGES, "max_tokens": 2},
                  _auth("wrong"), 401, ("code", "invalid_api_key")),
    "unknown-model": ("/completions", {"model": "gpt-4o", "prompt": "x", "max_tokens": 2},
                      None, 404, ("code", "model_not_found")),
}
#: A client that reads a little of a long stream and hangs up: the server must stop and carry on.
ABANDON = "abandon-stream"


def _pick(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.70:
        return rng.choice(GOOD)
    if roll < 0.75:
        return ABANDON
    return rng.choice(sorted(BAD))


def _check_error(response: httpx.Response, status: int, field: tuple[str, str]) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error[field[0]] == field[1], error


def _stream_tokens(response: httpx.Response, chat: bool) -> int:
    """Read a whole SSE reply; returns its completion tokens (from the usage chunk)."""
    usage, done, finishes = None, False, 0
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        event = json.loads(data)
        assert "error" not in event, event
        assert event["object"] == ("chat.completion.chunk" if chat else "text_completion")
        if event.get("usage"):
            usage = event["usage"]
        finishes += sum(1 for choice in event["choices"] if choice.get("finish_reason"))
    assert done and finishes == 1 and usage is not None
    return usage["completion_tokens"]


def _one_request(client: httpx.Client, kind: str, rng: random.Random) -> tuple[int, int]:
    """Send one request of ``kind`` and check the answer; returns (status, completion tokens)."""
    if kind in BAD:
        path, body, headers, status, field = BAD[kind]
        if body.get("stream"):
            with client.stream("POST", path, json=body, headers=headers) as response:
                response.read()
                _check_error(response, status, field)
        else:
            response = client.post(path, json=body, headers=headers)
            _check_error(response, status, field)
        return response.status_code, 0
    if kind == ABANDON:
        body = {"model": rng.choice(["outlier-nano", "outlier-plus"]), "prompt": "def f(", "max_tokens": 100,
                "stream": True}
        with client.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            for number, _ in enumerate(response.iter_lines()):
                if number >= 3:
                    break
        return response.status_code, 0
    path, body = _good(kind, rng)
    chat = path == "/chat/completions"
    if body.get("stream"):
        with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                response.read()
            assert response.status_code == 200, response.text
            tokens = _stream_tokens(response, chat)
    else:
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["object"] == ("chat.completion" if chat else "text_completion") and reply["model"] == body["model"]
        assert len(reply["choices"]) == 1 and reply["choices"][0]["finish_reason"] in ("stop", "length")
        tokens = reply["usage"]["completion_tokens"]
    assert 0 <= tokens <= body["max_tokens"]
    return response.status_code, tokens


@pytest.mark.soak
def test_sixteen_clients_on_two_tiers_with_bad_requests(server):
    process, base_url, log_path = server
    server_process = psutil.Process(process.pid)
    rss: list[tuple[float, int]] = []
    lock = threading.Lock()
    by_status: Counter = Counter()
    by_kind: Counter = Counter()
    failures: list[str] = []
    latencies: list[float] = []
    totals = {"requests": 0, "tokens": 0}
    started = time.monotonic()
    deadline = started + DURATION_SECONDS
    finished = threading.Event()

    def sample_rss() -> None:
        while not finished.is_set():
            rss.append((time.monotonic() - started, server_process.memory_info().rss))
            finished.wait(0.25)

    def client(number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(base_url=base_url, headers=_auth(), timeout=180) as http:
            while time.monotonic() < deadline:
                with lock:
                    if totals["requests"] >= MAX_REQUESTS:
                        return
                    totals["requests"] += 1
                kind = _pick(rng)
                began = time.monotonic()
                try:
                    status, tokens = _one_request(http, kind, rng)
                except (httpx.TransportError, AssertionError, ValueError) as exc:
                    with lock:
                        failures.append(f"client {number} {kind}: {type(exc).__name__}: {exc}")
                        by_status["failed"] += 1
                    continue
                with lock:
                    by_status[str(status)] += 1
                    by_kind[kind] += 1
                    totals["tokens"] += tokens
                    latencies.append(time.monotonic() - began)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DURATION_SECONDS + 300)
    duration = time.monotonic() - started
    alive = process.poll() is None
    stats = httpx.get(f"{base_url}/outlier/stats", headers=_auth(), timeout=30) if alive else None
    finished.set()
    sampler.join(timeout=5)

    figures = [b for _, b in rss]
    warm = [b for t, b in rss if t >= DURATION_SECONDS / 4] or figures
    latencies.sort()
    summary = {
        "requests": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": dict(sorted(by_kind.items())),
        "completion_tokens": totals["tokens"],
        "duration_s": round(duration, 1),
        "requests_per_s": round(sum(by_status.values()) / duration, 2),
        "latency_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "latency_max_s": round(latencies[-1], 2) if latencies else None,
        "rss_samples": len(figures),
        "rss_first_mb": round(figures[0] / 2**20, 1),
        "rss_warm_mb": round(warm[0] / 2**20, 1),
        "rss_max_mb": round(max(figures) / 2**20, 1),
        "rss_last_mb": round(figures[-1] / 2**20, 1),
        "server_alive": alive,
    }
    print("\n" + json.dumps(summary))

    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert alive, f"the server died:\n{log_path.read_text()[-5000:]}"
    assert not failures, "\n".join(failures[:20])
    log = log_path.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-5000:]
    assert stats.status_code == 200 and stats.json()["last_request"] is not None
    assert by_status["200"] > 0 and set(by_status) <= {"200", "400", "401", "404"}
    assert all(by_kind[kind] > 0 for kind in GOOD)  # every good kind was served at least once
    assert max(figures) < MAX_RSS_BYTES
    assert figures[-1] - warm[0] < MAX_RSS_GROWTH_BYTES
