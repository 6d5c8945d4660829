"""Build tiny random models offline, in exactly the on-disk layout ``mlx_lm.load`` reads.

Tests, demos and benchmarks need real checkpoints of several architectures (dense and
Mixture-of-Experts) without a download. A tiny model here is an mlx-lm model class built
from a small config, given seeded random weights, quantized by mlx-lm's own
``quantize_model`` (4-bit affine, group 64, float32 scales) and written by mlx-lm's own
``save_model`` / ``save_config``, next to a byte-level BPE tokenizer trained on the Python
standard library. Same arguments, same bytes.

    path = tiny_model("qwen3_5_moe", num_experts=16, top_k=4)
    model, tokenizer = mlx_lm.load(str(path))
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.utils
from mlx.utils import tree_flatten, tree_unflatten
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

from outlier_runtime.core.errors import OutlierError
from outlier_runtime.testing.tokenizer_training import eos_token_id, read_texts, save_tokenizer, train_tokenizer

CACHE_ENV = "OUTLIER_TINY_CACHE"
HOME_ENV = "OUTLIER_HOME"
#: Bump when the builder changes what it writes, so cached models are rebuilt.
BUILDER_VERSION = 1
DEFAULT_VOCAB_SIZE = 512
QUANT_GROUP_SIZE = 64
QUANT_BITS = 4

# A fixed slice of the standard library (present in every CPython since 3.8): large
# enough for a useful 512-token BPE, small enough to train in well under a second.
TOKENIZER_CORPUS = (
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py",
    "collections/__init__.py", "contextlib.py", "copy.py", "dataclasses.py", "enum.py",
    "fnmatch.py", "functools.py", "heapq.py", "json/decoder.py", "json/encoder.py",
    "keyword.py", "queue.py", "random.py", "shlex.py", "string.py", "textwrap.py",
    "tokenize.py", "typing.py",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Qwen's pre-tokenizer split (digits one by one, newline runs kept whole). transformers 5
# ignores tokenizer.json's pre-tokenizer for some model types (qwen3_5_moe among them) and
# rebuilds Qwen3_5Tokenizer from the vocab and merges with this regex and NFC; giving
# tokenizer.json the same normalizer and pre-tokenizer makes that substitution a no-op,
# so every loader produces the same token ids.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class TinyModelError(OutlierError):
    """A tiny model was asked for with an unknown architecture or impossible sizes."""


@dataclass(frozen=True)
class Shape:
    """The sizes a tiny config is made from; everything else is derived from them."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class TinyArchitecture:
    """One supported mlx-lm ``model_type`` and how its tiny config is made."""

    name: str
    is_moe: bool
    #: The attribute of a MoE block that holds the stacked experts (a SwitchGLU).
    expert_attribute: str | None
    default_layers: int
    default_experts: int
    default_top_k: int
    make_config: Callable[[Shape], dict[str, Any]]

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The dict holding the model's hyperparameters (nested for multimodal wrappers)."""
        return config.get("text_config", config)


def _attention(shape: Shape) -> dict[str, Any]:
    # Four query heads over two KV heads: grouped-query attention, as every target uses.
    return {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": shape.hidden_size // 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
    }


def _llama(shape: Shape) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **_attention(shape),
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": 2 * shape.hidden_size,
        "rope_theta": 500000.0,
        # Untied: with random weights a tied head mostly echoes the input token.
        "tie_word_embeddings": False,
    }


def _qwen3(shape: Shape) -> dict[str, Any]:
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        **_attention(shape),
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": 2 * shape.hidden_size,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    }


def _qwen3_moe(shape: Shape) -> dict[str, Any]:
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        **_attention(shape),
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": 2 * shape.hidden_size,
        "moe_intermediate_size": shape.hidden_size,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        # Every layer sparse: no dense layers hidden among the MoE ones.
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    }


def _qwen3_5_moe(shape: Shape) -> dict[str, Any]:
    # Linear-attention (gated delta) layers with a full-attention layer every
    # `interval`; production uses 4. Capped by the layer count because mlx-lm indexes
    # the cache of layer `interval - 1` to build the attention mask. transformers derives
    # layer_types from the same key, so the config carries no layer_types of its own.
    interval = min(4, shape.num_layers)
    text_config = {
        "model_type": "qwen3_5_moe_text",
        **_attention(shape),
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "full_attention_interval": interval,
        # Head dims of 32 keep the Metal gated-delta kernel eligible on Apple Silicon.
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "moe_intermediate_size": shape.hidden_size,
        "shared_expert_intermediate_size": shape.hidden_size,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
    }
    return {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": text_config,
        "tie_word_embeddings": False,
    }


def _mixtral(shape: Shape) -> dict[str, Any]:
    attention = _attention(shape)
    attention.pop("head_dim")  # mixtral derives it from hidden_size / heads
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        **attention,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": shape.hidden_size,
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    }


def _gpt_oss(shape: Shape) -> dict[str, Any]:
    # gpt_oss alternates sliding-window and full attention and needs one of each.
    layer_types = ["sliding_attention", "full_attention"] * math.ceil(shape.num_layers / 2)
    return {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        **_attention(shape),
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": shape.hidden_size,
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "sliding_window": 32,
        "layer_types": layer_types[: shape.num_layers],
        "rope_theta": 150000,
        "tie_word_embeddings": False,
    }


def _dense(name: str, make_config: Callable[[Shape], dict[str, Any]]) -> TinyArchitecture:
    return TinyArchitecture(name, False, None, 2, 0, 0, make_config)


def _moe(
    name: str,
    make_config: Callable[[Shape], dict[str, Any]],
    *,
    experts_at: str,
    layers: int,
    experts: int,
    top_k: int,
) -> TinyArchitecture:
    return TinyArchitecture(name, True, experts_at, layers, experts, top_k, make_config)


#: Every architecture tiny_model builds. The MoE ones make every layer a MoE layer.
ARCHITECTURES: tuple[TinyArchitecture, ...] = (
    _dense("llama", _llama),
    _dense("qwen3", _qwen3),
    _moe("qwen3_moe", _qwen3_moe, experts_at="switch_mlp", layers=2, experts=16, top_k=4),
    # The production architecture: 3 linear-attention layers, then 1 full attention.
    _moe("qwen3_5_moe", _qwen3_5_moe, experts_at="switch_mlp", layers=4, experts=16, top_k=4),
    _moe("mixtral", _mixtral, experts_at="switch_mlp", layers=2, experts=8, top_k=2),
    _moe("gpt_oss", _gpt_oss, experts_at="experts", layers=2, experts=8, top_k=4),
)
MOE_ARCHITECTURES = tuple(a.name for a in ARCHITECTURES if a.is_moe)


def architecture(name: str) -> TinyArchitecture:
    """The supported architecture called ``name`` (an mlx-lm model_type)."""
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    names = ", ".join(a.name for a in ARCHITECTURES)
    raise TinyModelError(f"Unknown tiny-model architecture {name!r}; expected one of: {names}.")


# ---------------------------------------------------------------------------- tokenizer


def default_cache_dir() -> Path:
    """Where tiny models are cached when no cache_dir is given.

    ``$OUTLIER_TINY_CACHE``, else ``$OUTLIER_HOME/tiny-models``, else
    ``~/.cache/outlier-runtime/tiny-models``.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]) / "tiny-models"
    return Path.home() / ".cache" / "outlier-runtime" / "tiny-models"


def tokenizer_corpus() -> list[Path]:
    """The standard-library files the tiny tokenizer is trained on."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / name for name in TOKENIZER_CORPUS]


def tiny_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, *, cache_dir: Path | str | None = None
) -> Path:
    """A directory holding the tiny BPE tokenizer's files; trained once per vocab size."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "tokenizers" / f"bpe-{vocab_size}"
    if not target.exists():
        with _building(target) as tmp:
            tokenizer = train_tokenizer(read_texts(tokenizer_corpus()), vocab_size=vocab_size)
            save_tokenizer(_qwen_style(tokenizer), tmp)
    return target


def _qwen_style(tokenizer: Tokenizer) -> Tokenizer:
    """Use Qwen's normalizer and pre-tokenizer, keeping the trained vocab and merges."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer


# ------------------------------------------------------------------------------ weights


def _key_for(seed: int, arch: str, name: str) -> mx.array:
    # One key per parameter name: the weights do not depend on construction order or
    # on whatever else used the global random state. The arch is mixed in so that two
    # architectures sharing parameter names (llama, qwen3) still get different weights.
    digest = hashlib.sha256(f"{seed}:{arch}:{name}".encode()).digest()
    return mx.random.key(int.from_bytes(digest[:8], "little"))


def _initial_value(name: str, current: mx.array, key: mx.array) -> mx.array:
    """A random value for one parameter drawn from ``key``, scaled so activations stay O(1)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "A_log":  # gated-delta decay rates, drawn as mlx-lm draws them
        return mx.log(mx.random.uniform(1.0, 16.0, current.shape, key=key))
    if leaf in ("bias", "sinks"):
        # Non-zero, so a runtime that drops expert biases or sinks gives different logits.
        return 0.1 * mx.random.normal(current.shape, key=key)
    if current.ndim == 1:
        return current  # norm weights (ones) and constants such as dt_bias
    fan_in = current.shape[-1]
    if "conv1d" in name:
        fan_in = current.shape[-2] * current.shape[-1]
    if "embed_tokens" in name:
        fan_in = 1  # unit-scale embeddings, as trained models have; keeps greedy output varied
    return mx.random.normal(current.shape, key=key) * (fan_in**-0.5)


def _randomize(model: nn.Module, arch: str, seed: int) -> None:
    params = tree_flatten(model.parameters())
    values = [(n, _initial_value(n, v, _key_for(seed, arch, n))) for n, v in params]
    model.update(tree_unflatten(values))
    mx.eval(model.parameters())


# ------------------------------------------------------------------------------ saving


def _greedy_shards(max_bytes: int) -> Callable[..., list]:
    """mlx-lm's make_shards algorithm with a byte limit instead of whole gigabytes."""

    def make_shards(weights: dict, max_file_size_gb: int | None = None) -> list:
        shards: list[dict] = []
        size = 0
        for name, value in weights.items():
            if not shards or size + value.nbytes > max_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = value
            size += value.nbytes
        return shards

    return make_shards


@contextlib.contextmanager
def _shard_limit(max_bytes: int | None) -> Iterator[None]:
    # save_model only shards at whole gigabytes and takes no limit argument; swapping
    # its splitter for the duration keeps every other byte of the layout mlx-lm's own.
    if max_bytes is None:
        yield
        return
    original = mlx_lm.utils.make_shards
    mlx_lm.utils.make_shards = _greedy_shards(max_bytes)
    try:
        yield
    finally:
        mlx_lm.utils.make_shards = original


@contextlib.contextmanager
def _building(target: Path) -> Iterator[Path]:
    """Build into a temporary sibling of ``target``, then rename it into place.

    A crash leaves only a temporary directory, never a half-written ``target``; when
    another process finished the same target first, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------- build


def tiny_config(
    arch: str,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    num_experts: int | None = None,
    top_k: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    **config_overrides: Any,
) -> dict[str, Any]:
    """The unquantized config.json contents of a tiny ``arch`` model.

    ``config_overrides`` replace keys of the hyperparameter dict (``text_config`` for
    qwen3_5_moe), e.g. ``full_attention_interval=2``.
    """
    spec = architecture(arch)
    shape = Shape(
        vocab_size=vocab_size,
        # 128, not 64, so every quantized row holds two groups of 64: a reader that
        # mixes up the scales' layout gives wrong numbers instead of passing by luck.
        hidden_size=hidden_size or 128,
        num_layers=num_layers or spec.default_layers,
        num_experts=(num_experts or spec.default_experts) if spec.is_moe else 0,
        top_k=(top_k or spec.default_top_k) if spec.is_moe else 0,
    )
    if shape.hidden_size % QUANT_GROUP_SIZE:
        raise TinyModelError(
            f"hidden_size={shape.hidden_size}: must be a multiple of {QUANT_GROUP_SIZE} "
            "(the quantization group size), e.g. 64 or 128."
        )
    if spec.is_moe and not 1 <= shape.top_k <= shape.num_experts:
        raise TinyModelError(
            f"top_k={shape.top_k} with num_experts={shape.num_experts}: top_k must be "
            "between 1 and num_experts."
        )
    if arch == "gpt_oss" and shape.num_layers < 2:
        raise TinyModelError("gpt_oss needs num_layers >= 2 (one sliding, one full attention).")
    config = spec.make_config(shape)
    spec.text_config(config).update(config_overrides)
    return config


def build_tiny_model(
    out_dir: Path | str,
    arch: str,
    *,
    seed: int = 0,
    num_experts: int | None = None,
    top_k: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    quantize: bool = True,
    max_shard_bytes: int | None = None,
    cache_dir: Path | str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``arch`` model to ``out_dir`` (created) and return its path.

    The weights are float32, seeded by ``seed``, then (by default) quantized to 4-bit
    affine with group size 64 and float32 scales, as ``mlx_lm.convert -q`` would.
    ``max_shard_bytes`` splits the weights into several model-0000N-of-0000M files.
    ``cache_dir`` is where the trained tokenizer is cached.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TinyModelError(f"{out}: the output directory exists and is not empty.")
    config = tiny_config(
        arch,
        vocab_size=vocab_size,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden_size,
        num_layers=num_layers,
        **config_overrides,
    )
    tokenizer_dir = tiny_tokenizer(vocab_size, cache_dir=cache_dir)
    config["eos_token_id"] = _eos_id(tokenizer_dir)
    config["torch_dtype"] = "float32"

    module = importlib.import_module(f"mlx_lm.models.{arch}")
    model = module.Model(module.ModelArgs.from_dict(config))
    _randomize(model, arch, seed)
    if quantize:
        # quantize_model applies the model's own quant_predicate (8-bit routers, etc.)
        # and records per-layer exceptions in the config; it prints a summary line.
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = mlx_lm.utils.quantize_model(
                model, config, group_size=QUANT_GROUP_SIZE, bits=QUANT_BITS, mode="affine"
            )
        mx.eval(model.parameters())

    with _shard_limit(max_shard_bytes):
        mlx_lm.utils.save_model(out, model)
    mlx_lm.utils.save_config(config, out / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def _eos_id(tokenizer_dir: Path) -> int:
    return eos_token_id(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))


def tiny_model(arch: str, *, cache_dir: Path | str | None = None, **build_kwargs: Any) -> Path:
    """The path of a cached tiny ``arch`` model built with ``build_kwargs``; built on first use.

    Takes the keyword arguments of :func:`build_tiny_model`. The cache directory is
    ``cache_dir``, else :func:`default_cache_dir`.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Bind to build_tiny_model's signature so that seed=0 and no seed share one entry.
    bound = inspect.signature(build_tiny_model).bind(None, arch, cache_dir=cache, **build_kwargs)
    bound.apply_defaults()
    key = dict(bound.arguments)
    for unkeyed in ("out_dir", "cache_dir"):
        key.pop(unkeyed)
    key.update(builder=BUILDER_VERSION, mlx_lm=mlx_lm.__version__)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    target = cache / f"{arch}-{digest[:16]}"
    if not target.exists():
        with _building(target) as tmp:
            build_tiny_model(tmp, arch, cache_dir=cache, **build_kwargs)
    return target
