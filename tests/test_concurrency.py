"""Many threads, one paged Runtime: calls queue on its lock, so each gets its single-threaded result.

The runtime has two slots per layer and a RAM cache of a few experts, so every request evicts
and reads; with the prefetcher, background reads run while another request's demand reads do.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import outlier_runtime

from helpers import assert_slots_hold_true_experts, paged_store

THREADS = 8
#: (prompt, options): greedy requests, and sampled ones whose seed makes them reproducible.
REQUESTS = [
    ("import os\n\ndef walk(path):\n", dict(max_tokens=12, temperature=0.0)),
    ("class Stack:\n    def push(self, item):\n", dict(max_tokens=10, temperature=0.0)),
    ("def fib(n):\n    if n < 2:\n", dict(max_tokens=14, temperature=0.0)),
    ("SELECT name FROM users WHERE", dict(max_tokens=8, temperature=0.0)),
    ("x = [i * i for i in range(", dict(max_tokens=11, temperature=0.0)),
    ("# TODO: handle the error\ntry:\n", dict(max_tokens=9, temperature=0.0)),
    ("async def fetch(url):\n", dict(max_tokens=12, temperature=0.9, seed=3)),
    ("for line in open(path):\n", dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=11)),
]


@pytest.fixture(params=[None, "next-layer-router"], ids=["no-prefetch", "prefetch"])
def runtime(request, tiny):
    path = tiny("qwen3_moe", seed=7)
    runtime = outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0.0004,
                                   prefetcher=request.param, force=True)
    yield runtime
    runtime.close()


def _run(runtime, index: int, streamed: bool) -> tuple:
    """One request's observable outcome: text, tokens, finish reason, expert lookups."""
    prompt, options = REQUESTS[index]
    if streamed:
        chunks = runtime.stream(prompt, chat=False, **options)
        pieces = []
        while True:
            try:
                pieces.append(next(chunks).text)
            except StopIteration as done:
                result = done.value
                break
        assert "".join(pieces) == result.text  # no other request's chunks leaked into this stream
    else:
        result = runtime.generate(prompt, chat=False, **options)
    # Lookups depend only on routing: a count mixed with another request's would differ.
    return result.text, result.tokens, result.finish_reason, result.engine["total"]["lookups"]


def test_concurrent_generations_equal_single_threaded_ones(runtime):
    alone = [_run(runtime, i, streamed=False) for i in range(len(REQUESTS))]
    assert len({tuple(tokens) for _, tokens, _, _ in alone}) == len(REQUESTS)  # distinct requests

    start = threading.Barrier(THREADS + 1)
    stop_polling = threading.Event()
    polls = []

    def client(number: int) -> list[tuple[int, tuple]]:
        start.wait()
        # Each thread runs its own request and then its neighbour's; odd threads stream.
        order = [number % len(REQUESTS), (number + 1) % len(REQUESTS)]
        return [(i, _run(runtime, i, streamed=bool(number % 2))) for i in order]

    def poll_stats() -> None:
        start.wait()
        while not stop_polling.is_set():
            polls.append(runtime.engine_stats()["total"]["lookups"])
            stop_polling.wait(0.01)

    with ThreadPoolExecutor(THREADS + 1) as pool:
        poller = pool.submit(poll_stats)
        futures = [pool.submit(client, number) for number in range(THREADS)]
        outcomes = [outcome for future in futures for outcome in future.result(timeout=300)]
        stop_polling.set()
        poller.result(timeout=30)

    assert len(outcomes) == 2 * THREADS
    for index, outcome in outcomes:
        assert outcome == alone[index], REQUESTS[index][0]
    assert polls  # stats were readable while generations ran

    store = paged_store(runtime)
    assert_slots_hold_true_experts(runtime)
    for slots in store.layers:
        assert len(slots.slot_of) <= slots.num_slots
        # An expert lives in a slot or in the RAM cache, never both.
        assert not any(slots.key(expert) in store.ram for expert in slots.slot_of)
    # Every record held is counted: the RAM cache's plus the prefetches still in flight.
    in_flight = sum(record.nbytes for record, _ in store._inflight.values())
    assert store.pool.held == store.ram.used + in_flight <= store.ram.budget
    # After all that, a request alone still gets its single-threaded result.
    assert _run(runtime, 0, streamed=False) == alone[0]
    if runtime.manifest.loader_options.prefetcher:
        assert runtime.last_result.engine["total"]["prefetched"] > 0  # background reads did run
