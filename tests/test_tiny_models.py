"""Tiny models: built offline, loaded by stock mlx-lm, deterministic, sharded on request."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU
from safetensors import safe_open
from tokenizers import Tokenizer

import outlier_runtime.testing.tiny_models as tiny_models
from outlier_runtime.testing.tiny_models import (
    ARCHITECTURES,
    MOE_ARCHITECTURES,
    TinyModelError,
    architecture,
    build_tiny_model,
    tiny_model,
    tokenizer_corpus,
)

ARCH_NAMES = [a.name for a in ARCHITECTURES]
PROMPT = "def hello(world):"


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One cache for the session; the env var too, so nothing can fall back to $HOME."""
    path = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tiny_models.CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def loaded(cache):
    """mlx_lm.load of each architecture's default tiny model, loaded once."""
    models = {}

    def load(arch: str):
        if arch not in models:
            path = tiny_model(arch, cache_dir=cache)
            models[arch] = (path, *mlx_lm.load(str(path)))
        return models[arch]

    return load


def saved_tensors(path: Path) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, shard file) for every tensor the index lists."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), "np") as f:
            for name in f.keys():
                view = f.get_slice(name)
                tensors[name] = (view.get_dtype(), view.get_shape(), shard)
    assert set(tensors) == set(index["weight_map"])
    return tensors


def weight_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("model*.safetensors"))}


def next_token_logits(model, tokenizer, text: str) -> mx.array:
    logits = model(mx.array([tokenizer.encode(text)]))
    return logits[0, -1].astype(mx.float32)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_architecture_loads_and_generates_varied_text(loaded, arch):
    path, model, tokenizer = loaded(arch)
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=8)]
    text = mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=8)

    assert len(tokens) == 8
    assert len(set(tokens)) > 2, f"{arch}: greedy output is degenerate: {tokens}"
    # mlx-lm's streaming BPE detokenizer drops the first token's leading space.
    assert text == tokenizer.decode(tokens).removeprefix(" ")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["quantization"]["group_size"] == 64
    assert config["quantization"]["bits"] == 4
    assert config["quantization_config"] == config["quantization"]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_quantized_weights_have_float32_scales(loaded, arch):
    path, _, _ = loaded(arch)
    tensors = saved_tensors(path)
    scales = {name: dtype for name, (dtype, _, _) in tensors.items() if name.endswith(".scales")}
    assert scales, f"{arch}: nothing was quantized"
    assert set(scales.values()) == {"F32"}
    packed = [n for n, (dtype, _, _) in tensors.items() if n.endswith("weight") and dtype == "U32"]
    assert any("embed_tokens" in n for n in packed)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_every_moe_layer_holds_stacked_experts(loaded, arch):
    path, model, _ = loaded(arch)
    spec = architecture(arch)
    config = json.loads((path / "config.json").read_text())
    text_config = spec.text_config(config)
    num_experts = text_config.get("num_experts") or text_config["num_local_experts"]
    num_layers = text_config["num_hidden_layers"]

    switches = [(name, m) for name, m in model.named_modules() if isinstance(m, SwitchGLU)]
    assert len(switches) == num_layers, "every layer should be a MoE layer"
    for name, switch in switches:
        assert name.endswith(f".{spec.expert_attribute}")
        for proj in (switch.gate_proj, switch.up_proj, switch.down_proj):
            assert isinstance(proj, QuantizedSwitchLinear)
            assert proj.weight.shape[0] == num_experts
            assert proj.scales.dtype == mx.float32

    tensors = saved_tensors(path)
    prefix = switches[0][0]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for part in ("weight", "scales", "biases"):
            _, shape, _ = tensors[f"{prefix}.{proj}.{part}"]
            assert shape[0] == num_experts


def test_dense_architectures_have_no_experts(loaded):
    for arch in ("llama", "qwen3"):
        _, model, _ = loaded(arch)
        assert not any(isinstance(m, SwitchGLU) for _, m in model.named_modules())


def test_gpt_oss_experts_carry_nonzero_biases(loaded):
    path, model, _ = loaded("gpt_oss")
    tensors = saved_tensors(path)
    dtype, shape, _ = tensors["model.layers.0.mlp.experts.down_proj.bias"]
    assert (dtype, shape) == ("F32", [8, 128])
    bias = model.model.layers[0].mlp.experts.down_proj.bias
    assert mx.abs(bias).max().item() > 0


def test_qwen3_5_moe_mixes_linear_and_full_attention_with_a_shared_expert(loaded):
    _, model, _ = loaded("qwen3_5_moe")
    layers = model.layers
    assert [layer.is_linear for layer in layers] == [True, True, True, False]
    block = layers[0].mlp
    assert block.top_k == 4 and block.num_experts == 16
    assert hasattr(block, "shared_expert") and hasattr(block, "shared_expert_gate")


def test_sizes_and_routing_follow_the_arguments(cache):
    path = tiny_model(
        "qwen3_5_moe", cache_dir=cache, num_experts=12, top_k=3, num_layers=2, hidden_size=64
    )
    model, _ = mlx_lm.load(str(path))
    assert [layer.is_linear for layer in model.layers] == [True, False]
    block = model.layers[1].mlp
    assert (block.num_experts, block.top_k) == (12, 3)
    assert block.switch_mlp.up_proj.weight.shape[0] == 12
    assert model.language_model.model.embed_tokens.scales.shape == (512, 1)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_chat_template_comes_through_mlx_lm_load(loaded, arch):
    _, _, tokenizer = loaded(arch)
    messages = [{"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "llama"])
def test_mlx_lm_tokenizer_encodes_like_tokenizer_json(loaded, arch):
    # transformers swaps in Qwen3_5Tokenizer for qwen3_5_moe; the ids must not change.
    path, _, tokenizer = loaded(arch)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = [p.read_text(encoding="utf-8") for p in tokenizer_corpus()[:3]]
    texts += [
        "Cafe\u0301 na\u00efve 12345\r\n\r\n\t\tx  = 'y'  # 😀",  # NFC, digits, CRLF
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    for text in texts:
        assert tokenizer.encode(text) == raw.encode(text).ids


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, cache):
    first = build_tiny_model(tmp_path / "a", "qwen3_5_moe", seed=0, cache_dir=cache)
    again = build_tiny_model(tmp_path / "b", "qwen3_5_moe", seed=0, cache_dir=cache)
    other = build_tiny_model(tmp_path / "c", "qwen3_5_moe", seed=1, cache_dir=cache)

    assert weight_bytes(first) == weight_bytes(again)
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    assert weight_bytes(first) != weight_bytes(other)
    assert (first / "config.json").read_bytes() == (other / "config.json").read_bytes()


def test_max_shard_bytes_splits_a_layers_experts_and_loads_the_same_model(tmp_path, cache):
    whole = build_tiny_model(tmp_path / "whole", "mixtral", cache_dir=cache)
    split = build_tiny_model(tmp_path / "split", "mixtral", max_shard_bytes=64_000, cache_dir=cache)

    shards = sorted(p.name for p in split.glob("*.safetensors"))
    assert len(shards) > 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = saved_tensors(split)
    experts = [n for n in tensors if ".switch_mlp." in n]
    for layer in (0, 1):
        files = {tensors[n][2] for n in experts if f".layers.{layer}." in n}
        assert len(files) > 1, f"layer {layer}'s experts all landed in one shard"
    assert mx.array_equal(
        next_token_logits(*mlx_lm.load(str(whole)), PROMPT),
        next_token_logits(*mlx_lm.load(str(split)), PROMPT),
    )


def test_unquantized_build_is_float32(tmp_path, cache):
    path = build_tiny_model(tmp_path / "fp", "qwen3_moe", quantize=False, cache_dir=cache)
    config = json.loads((path / "config.json").read_text())
    assert "quantization" not in config
    tensors = saved_tensors(path)
    assert {dtype for dtype, _, _ in tensors.values()} == {"F32"}
    assert tensors["model.layers.0.mlp.switch_mlp.gate_proj.weight"][1] == [16, 128, 128]
    model, tokenizer = mlx_lm.load(str(path))
    assert len(mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=4)) > 0


def test_tiny_model_is_cached_by_its_arguments(cache, monkeypatch):
    first = tiny_model("mixtral", cache_dir=cache)
    assert tiny_model("mixtral", cache_dir=cache, seed=0) == first  # defaults spelt out
    assert tiny_model("mixtral") == first  # $OUTLIER_TINY_CACHE, set by the fixture
    assert tiny_model("mixtral", cache_dir=cache, seed=3) != first

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached model was rebuilt")

    monkeypatch.setattr(tiny_models.mlx_lm.utils, "save_model", no_rebuild)
    assert tiny_model("mixtral", cache_dir=cache) == first


def test_a_failed_build_leaves_nothing_behind(tmp_path, cache, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tiny_models.mlx_lm.utils, "save_config", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_model("llama", cache_dir=tmp_path, seed=7)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizers"]
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == ["bpe-512"]


def test_bad_requests_say_what_is_wrong(tmp_path):
    with pytest.raises(TinyModelError, match="expected one of: llama"):
        tiny_model("deepseek_v3", cache_dir=tmp_path)
    with pytest.raises(TinyModelError, match="multiple of 64"):
        tiny_model("llama", cache_dir=tmp_path, hidden_size=96)
    with pytest.raises(TinyModelError, match="top_k"):
        tiny_model("mixtral", cache_dir=tmp_path, num_experts=4, top_k=5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(TinyModelError, match="not empty"):
        build_tiny_model(tmp_path / "full", "llama", cache_dir=tmp_path)
