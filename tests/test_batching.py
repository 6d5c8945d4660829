"""Continuous batching: sequences decoded together give stock mlx-lm's batched tokens, join and
leave between steps, keep their own budgets, stops and penalties, and a paged MoE reads the
union of a step's experts once."""

from __future__ import annotations

import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, batch_generate, stream_generate

import outlier_runtime
from outlier_paged_moe.switch import PagedSwitch
from outlier_runtime.core.batch_generation import (
    ContinuousBatch,
    generate_together,
    generator_sizes,
    unbatchable_reason,
)
from outlier_runtime.core.prompt_cache import PrefixCache

from helpers import paged_store

#: Prompts of different lengths (the batch pads them), one long enough that mlx-lm sorts a MoE
#: layer's token-expert pairs while prefilling it.
PROMPTS = [
    "def f(",
    "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n",
    "class Stack:\n    def push(self, x):",
    "print(",
    "x = [i * i for i in range(",
    "# TODO: handle the error\ntry:\n",
]
#: Each prompt's token budget: sequences leave the batch at different steps.
BUDGETS = [10, 14, 7, 12, 9, 14]


@pytest.fixture(scope="module", params=["nano:llama", "plus:qwen3_moe", "plus:qwen3_5_moe"])
def tier(request, tiny, tmp_path_factory):
    """(runtime, stock model, stock tokenizer): a dense tier, and paged MoE tiers with 2 slots per
    layer and no RAM cache (every step reads experts), beside stock mlx-lm on the same weights."""
    name, arch = request.param.split(":")
    path = tiny(arch)
    paging = dict(k_override=2, cache_gb=0) if name == "plus" else {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTLIER_HOME", str(tmp_path_factory.mktemp("outlier-home")))
        runtime = outlier_runtime.load(name, model=str(path), force=True, **paging)
    model, tokenizer = mlx_lm.load(str(path))
    yield runtime, model, tokenizer
    runtime.close()


def _ids(runtime, prompts=PROMPTS):
    return [runtime.encode(p, chat=False) for p in prompts]


def _stock_batch(model, tokenizer, prompts, budgets, max_batch):
    response = batch_generate(model, tokenizer, prompts, max_tokens=budgets, return_token_ids=True,
                              **generator_sizes(max_batch))
    return response.token_ids


def _streamed_text(tokenizer, tokens):
    """The text stock mlx-lm's streaming detokenizer makes of ``tokens`` (as stream_generate yields it)."""
    detokenizer = tokenizer.detokenizer
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def _decode_all(batch, sequences, events=()):
    """Step ``batch`` until it is empty: each sequence's result and streamed text."""
    results, streamed = {}, {s: "" for s in sequences}
    for event in list(events):
        streamed[event.sequence] += event.chunk.text if event.chunk else ""
    while len(batch):
        for event in batch.step():
            if event.chunk is not None:
                streamed[event.sequence] += event.chunk.text
            if event.result is not None:
                results[event.sequence] = event.result
    return results, streamed


def test_a_batch_gives_stock_batch_generate_tokens_for_each_request(tier):
    runtime, model, tokenizer = tier
    prompts = _ids(runtime)
    batch = ContinuousBatch(runtime, len(prompts))
    try:
        sequences = [batch.add(p, max_tokens=n, temperature=0.0) for p, n in zip(prompts, BUDGETS)]
        results, streamed = _decode_all(batch, sequences)
        assert batch.largest_batch == len(prompts) and batch.batched_steps >= min(BUDGETS) - 1
    finally:
        batch.close()
    expected = _stock_batch(model, tokenizer, prompts, BUDGETS, len(prompts))
    for sequence, tokens, budget in zip(sequences, expected, BUDGETS):
        result = results[sequence]
        assert result.tokens == tokens
        assert result.text == streamed[sequence] == _streamed_text(tokenizer, tokens)
        assert result.finish_reason == ("length" if len(tokens) == budget else "stop")


def test_requests_joining_between_steps_decode_as_in_stock_batch_generator(tier):
    runtime, model, tokenizer = tier
    prompts = _ids(runtime)
    batch = ContinuousBatch(runtime, 4)
    stock = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], **generator_sizes(4))
    stock_tokens: dict[int, list[int]] = {}
    finished: set[int] = set()

    def stock_step():
        for response in stock.next()[1]:
            if response.finish_reason != "stop":
                stock_tokens.setdefault(response.uid, []).append(response.token)
            if response.finish_reason is not None:
                finished.add(response.uid)

    try:
        first = [batch.add(p, max_tokens=n, temperature=0.0) for p, n in zip(prompts[:2], BUDGETS[:2])]
        uids = stock.insert(prompts[:2], max_tokens=BUDGETS[:2])
        events = [e for _ in range(3) for e in batch.step()]
        for _ in range(3):
            stock_step()
        later = [batch.add(p, max_tokens=n, temperature=0.0) for p, n in zip(prompts[2:5], BUDGETS[2:5])]
        uids += stock.insert(prompts[2:5], max_tokens=BUDGETS[2:5])
        results, _ = _decode_all(batch, first + later, events)
        while len(finished) < len(uids):
            stock_step()
    finally:
        batch.close()
        stock.close()
    assert batch.largest_batch == 4  # the bound: the fifth joined when one had left
    for sequence, uid in zip(first + later, uids):
        assert results[sequence].tokens == stock_tokens[uid]


def test_a_request_alone_gives_stock_stream_generate_tokens(tier):
    runtime, model, tokenizer = tier
    for prompt in _ids(runtime, PROMPTS[:3]):
        (result,) = generate_together(runtime, [prompt], max_tokens=12, temperature=0.0)
        expected = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12)]
        if expected and expected[-1] in tokenizer.eos_token_ids:
            expected = expected[:-1]
        assert result.tokens == expected and result.text == _streamed_text(tokenizer, expected)


def test_each_request_keeps_its_stop_strings_and_penalties(nano):
    prompts = _ids(nano, PROMPTS[:4])
    alone = [nano.generate(p, max_tokens=12, temperature=0.0, chat=False) for p in PROMPTS[:4]]
    # A stop string taken from the middle of the second reply: that request stops there, the others not.
    stop = alone[1].text[4:7]
    assert stop and stop not in alone[1].text[:6]
    penalties = dict(repetition_penalty=1.5, presence_penalty=0.5)
    batch = ContinuousBatch(nano, 4)
    try:
        options = [dict(), dict(stop=[stop]), dict(**penalties), dict(max_tokens=3)]
        sequences = [batch.add(p, **{"max_tokens": 12, "temperature": 0.0, **o}) for p, o in zip(prompts, options)]
        results, streamed = _decode_all(batch, sequences)
    finally:
        batch.close()
    got = [results[s] for s in sequences]
    assert got[0].tokens == alone[0].tokens and got[0].text == alone[0].text
    stopped = nano.generate(PROMPTS[1], max_tokens=12, temperature=0.0, chat=False, stop=[stop])
    assert got[1].text == streamed[sequences[1]] == stopped.text == alone[1].text[:alone[1].text.index(stop)]
    assert got[1].finish_reason == "stop" and got[1].tokens == stopped.tokens
    penalized = nano.generate(PROMPTS[2], max_tokens=12, temperature=0.0, chat=False, **penalties)
    assert got[2].tokens == penalized.tokens and got[2].tokens != alone[2].tokens
    assert got[3].tokens == alone[3].tokens[:3] and got[3].finish_reason == "length"


def test_seeded_sampling_and_unknown_options_are_generated_alone(nano):
    assert unbatchable_reason(nano, {"temperature": 0.0, "seed": 3}) is None  # greedy: the seed changes nothing
    assert unbatchable_reason(nano, {"temperature": 0.8}) is None  # unseeded sampling is not reproducible anyway
    assert "seeded sampling" in unbatchable_reason(nano, {"temperature": 0.8, "seed": 3})
    assert "'logprobs'" in unbatchable_reason(nano, {"logprobs": True})


def test_a_batch_reuses_and_fills_the_prompt_cache(nano):
    cache = PrefixCache(10**9)
    prompts = _ids(nano, PROMPTS[:3])
    first = generate_together(nano, prompts, prompt_cache=cache, max_tokens=6, temperature=0.0)
    assert [r.cached_tokens for r in first] == [0, 0, 0] and len(cache) == 3
    follow_ups = [[*p, *r.tokens, *nano.encode("\n# next", chat=False)] for p, r in zip(prompts, first)]
    # A penalty sees the cached tokens too: the same tokens as prefilling everything.
    again = generate_together(nano, follow_ups, prompt_cache=cache, max_tokens=6, temperature=0.0,
                              repetition_penalty=1.3)
    fresh = generate_together(nano, follow_ups, max_tokens=6, temperature=0.0, repetition_penalty=1.3)
    for result, prompt, r, follow_up in zip(again, prompts, first, follow_ups):
        # Each follow-up prefills only its new turn: its prompt and reply came from the cache.
        assert r.finish_reason == "length" and result.cached_tokens == len(prompt) + len(r.tokens)
        assert result.prefill_tokens == len(follow_up) - result.cached_tokens
    assert [r.tokens for r in again] == [r.tokens for r in fresh]


def test_a_paged_step_reads_the_union_of_the_batch_experts_once(tiny, monkeypatch):
    runtime = outlier_runtime.load("plus", model=str(tiny("qwen3_moe")), k_override=8, cache_gb=0, force=True)
    store = paged_store(runtime)
    calls: list[tuple[np.ndarray, list[int]]] = []
    original_call, original_ensure = PagedSwitch.__call__, store.ensure

    def recording_call(self, x, indices):
        calls.append((None, []))
        out = original_call(self, x, indices)
        calls[-1] = (np.asarray(indices), calls[-1][1])
        return out

    def recording_ensure(layer, experts):
        calls[-1][1].extend(int(e) for e in experts)
        return original_ensure(layer, experts)

    monkeypatch.setattr(PagedSwitch, "__call__", recording_call)
    monkeypatch.setattr(store, "ensure", recording_ensure)
    try:
        prompts = _ids(runtime, PROMPTS)
        results = generate_together(runtime, prompts, max_tokens=6, temperature=0.0)
        total = results[-1].engine["total"]
        expert_bytes = results[-1].engine["config"]["expert_bytes"]
    finally:
        runtime.close()
    decode_calls = [(ids, looked_up) for ids, looked_up in calls if ids.shape[:2] == (len(prompts), 1)]
    assert decode_calls  # steps that decoded every prompt at once
    shared = 0
    for ids, looked_up in calls:
        # Each distinct expert of the call is looked up exactly once, whichever sequences routed to it.
        assert sorted(looked_up) == sorted(set(ids.reshape(-1).tolist()))
    for ids, looked_up in decode_calls:
        shared += len(looked_up) < ids.size
    # 6 sequences x top-4 of 16 experts: some experts are shared in every step.
    assert shared == len(decode_calls)
    assert total["bytes_read"] == total["misses"] * expert_bytes
    assert total["lookups"] == sum(len(looked_up) for _, looked_up in calls)
