"""Bad files and failing reads: clear errors naming the file, and a cache that stays consistent."""

from __future__ import annotations

import json
import os
import shutil

import mlx_lm
import pytest

import outlier_runtime
from outlier_runtime import CheckpointError, ExpertReadError, hookimpl
from outlier_runtime.core.plugin_manager import register_plugin
from outlier_runtime.core.protocols import ReadRequest

from helpers import assert_slots_hold_true_experts

PROMPT = "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"


@pytest.fixture
def model_copy(tiny, tmp_path):
    """A private copy of a sharded tiny MoE that a test may damage."""
    source = tiny("qwen3_moe", max_shard_bytes=300_000, seed=5)
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def _expert_shard(path):
    """A shard that holds stacked expert tensors."""
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(v for k, v in weight_map.items() if ".switch_mlp." in k)
    return path / name


def _stock(path):
    model, tokenizer = mlx_lm.load(str(path))
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=10)]
    return model, tokenizer, tokens


def _load(path, **overrides):
    options = dict(model=str(path), k_override=2, cache_gb=0, force=True)
    options.update(overrides)
    return outlier_runtime.load("plus", **options)


def test_missing_shard_is_named(model_copy):
    shard = _expert_shard(model_copy)
    shard.unlink()
    with pytest.raises(CheckpointError) as error:
        _load(model_copy)
    assert shard.name in str(error.value)


def test_truncated_shard_is_named_at_load(model_copy):
    shard = _expert_shard(model_copy)
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(CheckpointError) as error:
        _load(model_copy)
    assert str(shard) in str(error.value)
    assert "truncated" in str(error.value)


@pytest.mark.parametrize("reader", ["pread", "mmap", "fanout"])
def test_shard_truncated_mid_run_fails_clearly_then_recovers(model_copy, reader):
    model, tokenizer, expected = _stock(model_copy)
    runtime = _load(model_copy, reader=reader)
    try:
        runtime.generate("def f(", max_tokens=2, temperature=0.0, chat=False)
        shard = _expert_shard(model_copy)
        saved = shard.read_bytes()
        with open(shard, "r+b") as handle:
            handle.truncate(1024)
        with pytest.raises(ExpertReadError) as error:
            runtime.generate(PROMPT, max_tokens=10, temperature=0.0, chat=False)
        assert str(shard) in str(error.value)
        assert runtime.engine_stats()["read_retries"] > 0
        shard.write_bytes(saved)  # the disk is back: the runtime serves the next request exactly
        assert_slots_hold_true_experts(runtime)
        assert runtime.generate(PROMPT, max_tokens=10, temperature=0.0, chat=False).tokens == expected
        assert_slots_hold_true_experts(runtime)
    finally:
        runtime.close()


class _GarbageThenFail:
    """A reader that scribbles over the buffers and then fails every ``period``-th call."""

    calls = 0
    period = 3

    def __init__(self, **options):
        from outlier_readers.pread_reader import PreadReader

        self._inner = PreadReader()

    def read(self, requests: list[ReadRequest]) -> None:
        type(self).calls += 1
        if type(self).calls % self.period == 0:
            for request in requests:
                request.out[:] = b"\xff" * request.length
            raise ExpertReadError("injected: EIO", requests[0].path)
        self._inner.read(requests)

    def close(self) -> None:
        self._inner.close()


class _FlakyPlugin:
    @hookimpl
    def register_readers(self, register):
        register("garbage-then-fail", _GarbageThenFail)


def test_transient_read_errors_are_retried_and_never_cached(model_copy):
    register_plugin(_FlakyPlugin(), "flaky-reader")
    model, tokenizer, expected = _stock(model_copy)
    runtime = _load(model_copy, reader="garbage-then-fail", cache_gb=0.0003)
    try:
        result = runtime.generate(PROMPT, max_tokens=10, temperature=0.0, chat=False)
        assert result.tokens == expected  # the failed attempts' garbage was never computed with
        assert result.engine["read_retries"] > 0
        assert_slots_hold_true_experts(runtime)
    finally:
        runtime.close()


def test_a_flipped_byte_in_a_pack_is_detected(model_copy):
    from outlier_runtime.engine.pack import pack_model

    pack_model(model_copy)
    layer_file = model_copy / "experts-pack" / "layer-000.bin"
    data = bytearray(layer_file.read_bytes())
    data[100] ^= 0x01
    layer_file.write_bytes(bytes(data))
    runtime = _load(model_copy, verify_checksums=True, cache_gb=0.01)
    try:
        assert runtime.engine_stats()["config"]["pack"] == "used"
        with pytest.raises(ExpertReadError) as error:
            # Expert 0 of layer 0 holds byte 100: route everything until it is read.
            for _ in range(20):
                runtime.generate(PROMPT, max_tokens=10, temperature=0.7, seed=_, chat=False)
        assert "checksum" in str(error.value) and "layer-000.bin" in str(error.value)
    finally:
        runtime.close()


def test_a_pack_that_no_longer_matches_its_shards_is_refused(model_copy):
    from outlier_runtime.engine.pack import pack_model

    pack_model(model_copy)
    index = model_copy / "experts-pack" / "index.json"
    body = json.loads(index.read_text())
    body["layers"][0]["stride"] += 4096  # an edit that leaves the JSON valid
    index.write_text(json.dumps(body))
    model, tokenizer, expected = _stock(model_copy)
    runtime = _load(model_copy)
    try:
        assert runtime.engine_stats()["config"]["pack"].startswith("refused")
        assert runtime.generate(PROMPT, max_tokens=10, temperature=0.0, chat=False).tokens == expected
    finally:
        runtime.close()
