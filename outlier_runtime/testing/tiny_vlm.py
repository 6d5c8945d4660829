"""Build a tiny random vision-language model offline, in the on-disk layout ``mlx_vlm.load`` reads.

The Vision tier's architecture (``qwen3_5_moe``: a Qwen3-VL vision tower in front of the
Qwen3.5 MoE language model) with a few thousand parameters: mlx-vlm's own model class built
from a small config, given seeded random float32 weights, its language model quantized as the
product's checkpoints are (4-bit affine, group 64, float32 scales: fast on mlx's CPU backend;
the vision tower stays float, as mlx-vlm's converter leaves it), written with mlx's safetensors
writer next to the files mlx-vlm's processor reads (``preprocessor_config.json`` for the
image processor; ``tokenizer.json`` / ``tokenizer_config.json`` with a chat template that
places Qwen's vision tokens). The tokenizer is the tiny BPE of :mod:`tiny_models` plus
Qwen's vision special tokens. Nothing is downloaded; same arguments, same bytes.

    path = tiny_vlm()
    model, processor = mlx_vlm.load(str(path))

Needs the ``vision`` extra (mlx-vlm).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Tokenizer

from outlier_runtime.testing.tiny_models import (
    DEFAULT_VOCAB_SIZE,
    QUANT_BITS,
    QUANT_GROUP_SIZE,
    _building,
    _randomize,
    default_cache_dir,
    tiny_config,
    tiny_tokenizer,
)

#: Bump when the builder changes what it writes, so cached models are rebuilt.
BUILDER_VERSION = 3
ARCH = "qwen3_5_moe"

#: Qwen's vision special tokens, appended after the tiny BPE's vocabulary (in this order).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

#: ChatML that renders an image content part as Qwen does: start, one pad (the processor
#: repeats it once per merged patch), end.
VLM_CHAT_TEMPLATE = (
    # mlx-vlm passes enable_thinking (false) to templates that may use it, as Qwen's do; naming
    # it here keeps transformers from warning about an unused template argument.
    "{% set thinking = enable_thinking | default(false) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'input_image') %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Image sizes the tiny processor resizes to: between 32x32 and 64x64 pixels, so an image
#: becomes at most 16 patches of 16x16, merged 2x2 into at most 4 image tokens.
PATCH_SIZE = 16
MERGE_SIZE = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64


def tiny_vlm_config(vocab_size: int, eos_id: int, token_ids: dict[str, int], *, hidden_size: int = 128,
                    num_layers: int = 2, num_experts: int = 4, top_k: int = 2) -> dict[str, Any]:
    """config.json of the tiny qwen3_5_moe VLM: the tiny text config plus a one-block vision tower."""
    text = tiny_config(ARCH, vocab_size=vocab_size, num_experts=num_experts, top_k=top_k,
                       hidden_size=hidden_size, num_layers=num_layers)["text_config"]
    head_dim = text["head_dim"]
    # Multimodal RoPE: the three sections (time, height, width) split the rotary half-dimension.
    rotary_half = head_dim // 4
    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.5,
        "mrope_section": [rotary_half - 2 * (rotary_half // 3), rotary_half // 3, rotary_half // 3],
        "mrope_interleaved": True,
    }
    text["eos_token_id"] = eos_id
    vision = {
        "model_type": ARCH,
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": PATCH_SIZE,
        "spatial_patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "num_position_embeddings": 16,  # a 4x4 grid, interpolated to each image's grid
        "deepstack_visual_indexes": [],
    }
    return {
        "model_type": ARCH,
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "vocab_size": vocab_size,
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def _vlm_tokenizer(base_dir: Path) -> tuple[Tokenizer, dict[str, int]]:
    tokenizer = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    return tokenizer, {t: tokenizer.token_to_id(t) for t in VISION_TOKENS}


def _write_processor_files(out: Path, tokenizer: Tokenizer, base_dir: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = json.loads((base_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = VLM_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text((base_dir / "special_tokens_map.json").read_text())
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": 2,
        "merge_size": MERGE_SIZE,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    # Every file the processor would otherwise ask the Hub for is present (nothing is fetched).
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2))


def build_tiny_vlm(out_dir: Path | str, *, seed: int = 0, quantize: bool = True,
                   cache_dir: Path | str | None = None, **shape: Any) -> Path:
    """Write the tiny VLM to ``out_dir`` (created, must be empty) and return its path.

    ``shape`` takes ``hidden_size``, ``num_layers``, ``num_experts``, ``top_k``."""
    from mlx_vlm.models import qwen3_5_moe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = tiny_tokenizer(DEFAULT_VOCAB_SIZE, cache_dir=cache_dir)
    tokenizer, token_ids = _vlm_tokenizer(base_dir)
    vocab_size = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id("<|im_end|>")
    config = tiny_vlm_config(vocab_size, eos_id, token_ids, **shape)
    model = qwen3_5_moe.Model(qwen3_5_moe.ModelConfig.from_dict(config))
    _randomize(model, f"{ARCH}-vlm", seed)
    if quantize:
        import mlx.nn as nn
        from mlx_vlm.utils import get_class_predicate

        nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=QUANT_BITS, mode="affine",
                    class_predicate=get_class_predicate(skip_vision=True))
        config["quantization"] = {"group_size": QUANT_GROUP_SIZE, "bits": QUANT_BITS, "mode": "affine"}
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _write_processor_files(out, tokenizer, base_dir)
    return out


def tiny_vlm(*, cache_dir: Path | str | None = None, seed: int = 0, quantize: bool = True, **shape: Any) -> Path:
    """The path of the cached tiny VLM built with these arguments; built on first use."""
    import mlx_vlm

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = {"seed": seed, "quantize": quantize, **shape, "builder": BUILDER_VERSION, "mlx_vlm": mlx_vlm.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    target = cache / f"{ARCH}-vlm-{digest[:16]}"
    if not target.exists():
        with _building(target) as tmp:
            build_tiny_vlm(tmp, seed=seed, quantize=quantize, cache_dir=cache, **shape)
    return target
