"""The dense loader: same tokens as stock mlx-lm, streaming, chat templates, stops, threads, errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.sample_utils import make_sampler

import outlier_runtime
from outlier_runtime import ModelNotFoundError, RuntimeClosedError

PROMPT = "import os\n\ndef walk(path):\n"
PROMPTS = ["def f(", "class Queue:\n", "import json\n", "for i in range("]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def dense(request, tiny, tmp_path_factory):
    """A Nano runtime on a tiny model, and the same model loaded by stock mlx-lm."""
    path = tiny(request.param)
    with pytest.MonkeyPatch.context() as mp:  # module scope: isolate from ~/.config/outlier here too
        mp.setenv("OUTLIER_HOME", str(tmp_path_factory.mktemp("outlier-home")))
        runtime = outlier_runtime.load("nano", model=str(path), force=True)
    model, tokenizer = mlx_lm.load(str(path))
    yield runtime, model, tokenizer
    runtime.close()


def stock(model, tokenizer, prompt, n=NEW_TOKENS, sampler=None):
    """Text and tokens stock mlx-lm generates (tokens without a final end-of-sequence token)."""
    responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n, sampler=sampler))
    return "".join(r.text for r in responses), [r.token for r in responses if r.finish_reason != "stop"]


def test_greedy_tokens_equal_stock_mlx_lm(dense):
    runtime, model, tokenizer = dense
    result = runtime.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, chat=False)
    assert (result.text, result.tokens) == stock(model, tokenizer, PROMPT)


def test_seeded_sampling_equals_stock_mlx_lm_with_the_same_seed(dense):
    runtime, model, tokenizer = dense
    options = dict(max_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, seed=1234, chat=False)
    sampled = runtime.generate(PROMPT, **options).tokens

    mx.random.seed(1234)
    assert sampled == stock(model, tokenizer, PROMPT, sampler=make_sampler(temp=0.8, top_p=0.9))[1]
    assert runtime.generate(PROMPT, **options).tokens == sampled  # same seed, same tokens
    assert sampled != runtime.generate(PROMPT, **{**options, "temperature": 0.0}).tokens


def test_stream_chunks_add_up_to_the_result(dense):
    runtime, _, _ = dense
    chunks = list(runtime.stream(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, chat=False))
    result = runtime.last_result
    assert "".join(chunk.text for chunk in chunks) == result.text
    remaining = iter(result.tokens)  # a token that completes no text yet yields no chunk
    assert all(chunk.token in remaining for chunk in chunks)
    assert result.generation_tokens == len(result.tokens) == NEW_TOKENS
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(runtime.encode(PROMPT, chat=False))
    assert result.generation_tps > 0 and result.prompt_tps > 0
    assert result.peak_rss_gb > 0
    assert result.tier == "nano" and result.engine == {}


def test_chat_messages_go_through_the_chat_template(dense):
    runtime, _, tokenizer = dense
    messages = [{"role": "user", "content": "Write a function."}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert runtime.encode(messages) == list(expected)
    # A plain string is wrapped as one user message (the manifest's use_chat_template).
    assert runtime.encode("Write a function.") == list(expected)
    assert runtime.encode("Write a function.", chat=False) == list(tokenizer.encode("Write a function."))
    result = runtime.generate(messages, max_tokens=3, temperature=0.0)
    assert result.prompt_tokens == len(expected)


def test_the_code_tier_adds_its_system_prompt(tiny):
    with outlier_runtime.load("code", model=str(tiny("qwen3")), force=True) as code:
        system = code.manifest.generation.system_prompt
        tokenizer = code.tokenizer
        user = [{"role": "user", "content": "Sort a list."}]
        with_system = [{"role": "system", "content": system}, *user]
        assert code.encode(user) == list(tokenizer.apply_chat_template(with_system, add_generation_prompt=True))
        # The caller's own system message wins; the tier's is not added twice.
        own = [{"role": "system", "content": "Be brief."}, *user]
        assert code.encode(own) == list(tokenizer.apply_chat_template(own, add_generation_prompt=True))
        assert code.generate(user, max_tokens=2).prompt_tokens == len(code.encode(with_system))


def stop_strings(pieces: list[str]) -> dict[str, str]:
    """Two-character stop strings that first occur inside one chunk, and across two chunks."""
    full, found, offset = "".join(pieces), {}, 0
    for before, piece in zip(pieces, pieces[1:]):
        offset += len(before)
        if offset < 4 or not (before and piece):  # not at the very start: something is kept
            continue
        across = before[-1] + piece[0]
        if "across" not in found and full.index(across) == offset - 1:
            found["across"] = across
        if "inside" not in found and len(piece) >= 3 and full.index(piece[1:3]) == offset + 1:
            found["inside"] = piece[1:3]
    return found


@pytest.mark.parametrize("where", ["inside", "across"])
def test_a_stop_string_cuts_the_text(dense, where):
    runtime, _, _ = dense
    options = dict(max_tokens=40, temperature=0.0, chat=False)
    pieces = [chunk.text for chunk in runtime.stream(PROMPT, **options)]
    full = "".join(pieces)
    stop = stop_strings(pieces)[where]

    cut = runtime.generate(PROMPT, stop=["never seen", stop], **options)
    assert cut.text == full[:full.index(stop)]
    assert cut.finish_reason == "stop"
    # What was streamed is exactly the cut text: no part of the stop string slips out.
    assert "".join(chunk.text for chunk in runtime.stream(PROMPT, stop=[stop], **options)) == cut.text


def test_text_held_back_for_a_stop_string_that_never_comes_is_still_yielded(dense):
    runtime, _, _ = dense
    options = dict(max_tokens=20, temperature=0.0, chat=False)
    full = runtime.generate(PROMPT, **options).text
    # Every chunk ending in the stop string's first character is held back, then released.
    stop = full[-1] + "\x00"
    chunks = list(runtime.stream(PROMPT, stop=[stop], **options))
    assert "".join(chunk.text for chunk in chunks) == runtime.last_result.text == full
    assert runtime.last_result.finish_reason == "length"


def test_a_closed_runtime_refuses_to_generate(tiny):
    runtime = outlier_runtime.load("nano", model=str(tiny("llama")), force=True)
    assert runtime.generate("x", max_tokens=1).generation_tokens == 1
    runtime.close()
    runtime.close()  # twice is fine
    with pytest.raises(RuntimeClosedError, match="'nano' is closed"):
        runtime.generate("x", max_tokens=1)
    with pytest.raises(RuntimeClosedError):
        runtime.tokenizer


def test_concurrent_generate_calls_are_serialized_and_each_gets_its_own_result(dense):
    runtime, _, _ = dense
    options = dict(max_tokens=8, temperature=0.0, chat=False)
    expected = [runtime.generate(prompt, **options) for prompt in PROMPTS]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda prompt: runtime.generate(prompt, **options), PROMPTS * 3))

    for prompt, got, want in zip(PROMPTS * 3, results, expected * 3):
        assert (got.text, got.tokens, got.prompt_tokens) == (want.text, want.tokens, want.prompt_tokens), prompt


def test_a_missing_local_model_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as caught:
        outlier_runtime.load("nano", model=str(missing), force=True)
    assert str(missing) in str(caught.value) and "config.json" in str(caught.value)


def test_an_uncached_repo_offline_says_how_to_get_the_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE and its cache path at import, which may predate the fixture.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelNotFoundError) as caught:
        outlier_runtime.load("nano", model="outlier-tests/not-downloaded", force=True)
    message = str(caught.value)
    assert "'outlier-tests/not-downloaded'" in message
    assert "`outlier pull nano`" in message and "\n" not in message
    assert "[model] path" in message and "--model PATH" in message
