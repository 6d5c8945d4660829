"""A tiny llama whose chat template supports tools, and whose greedy reply is a tool call.

A random tiny model never writes a well-formed tool call by chance, so this one is built to:
every layer's attention and MLP outputs are zeroed, so the hidden state at a position is the
current token's embedding, and the output head is set so that a few chosen tokens predict
their successors (a bigram chain). After the template's generation prompt the greedy reply is
``<tool_call>`` + one call's JSON + ``</tool_call>`` + end-of-sequence. The call's JSON is a
single added token, so the chain has no repeated token. Everything else about the model (the
tokenizer, the template, mlx-lm's loading and tool-parser inference, the server's path) is the
ordinary one.

The template follows the Qwen3 layout (``<tools>`` in a system turn, ``<tool_call>`` JSON in
assistant turns, ``<tool_response>`` for results), so mlx-lm infers its ``json_tools`` parser.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
#: The call the model makes (compact JSON: one added token, decoded as these characters).
FORCED_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
FORCED_CALL_TEXT = json.dumps(FORCED_CALL, separators=(",", ":"))

TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'Functions you may call, one JSON object each:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nTo call one, reply with <tool_call>\\n"
    "{\"name\": <name>, \"arguments\": <object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- (tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson) }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Bumped when what this module builds changes (part of the cache key).
BUILDER_VERSION = 1
#: How far a chain successor's logit stands above the others (hidden size x this).
CHAIN_SCALE = 4.0


def tool_calling_model(*, cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """The path of the cached tool-calling tiny llama (built on first use)."""
    import mlx_lm

    from outlier_runtime.testing.tiny_models import _building, default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = json.dumps({"builder": BUILDER_VERSION, "seed": seed, "mlx_lm": mlx_lm.__version__,
                      "template": TOOL_CHAT_TEMPLATE, "call": FORCED_CALL_TEXT}, sort_keys=True)
    target = cache / f"llama-tools-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not target.exists():
        with _building(target) as tmp:
            build_tool_calling_model(tmp, cache_dir=cache, seed=seed)
    return target


def build_tool_calling_model(out_dir: Path | str, *, cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """Write the tool-calling tiny llama (float32, unquantized) to ``out_dir``."""
    import importlib

    import mlx_lm.utils
    from tokenizers import AddedToken, Tokenizer

    from outlier_runtime.testing.tiny_models import TOKENIZER_FILES, tiny_config, tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = tiny_tokenizer(cache_dir=cache_dir)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out / name)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    # Not special: mlx-lm's detokenizer keeps them in the text, where the tool parser looks.
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False)
                          for text in (TOOL_CALL_START, TOOL_CALL_END, FORCED_CALL_TEXT)])
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = TOOL_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))

    ids = {text: tokenizer.token_to_id(text) for text in (TOOL_CALL_START, TOOL_CALL_END, FORCED_CALL_TEXT,
                                                         "<|im_end|>")}
    prompt_end = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False).ids[-1]
    chain = [prompt_end, ids[TOOL_CALL_START], ids[FORCED_CALL_TEXT], ids[TOOL_CALL_END], ids["<|im_end|>"]]

    config = tiny_config("llama", vocab_size=tokenizer.get_vocab_size())
    config["eos_token_id"] = ids["<|im_end|>"]
    config["torch_dtype"] = "float32"
    module = importlib.import_module("mlx_lm.models.llama")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    _make_bigram_chain(model, chain, eps=config["rms_norm_eps"])
    mlx_lm.utils.save_model(out, model)
    mlx_lm.utils.save_config(config, out / "config.json")
    return out


def _make_bigram_chain(model: Any, chain: list[int], eps: float) -> None:
    """Zero every block's output, so the last hidden state is the (normalized) token embedding,
    and set the head so that ``chain[i]`` predicts ``chain[i + 1]``."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    embeddings = model.model.embed_tokens.weight
    head = mx.zeros_like(model.lm_head.weight)
    for current, successor in zip(chain, chain[1:]):
        e = embeddings[current]
        normalized = e * mx.rsqrt(mx.mean(e * e) + eps)
        head[successor] = head[successor] + CHAIN_SCALE * normalized
    model.lm_head.weight = head
    with contextlib.suppress(AttributeError):
        model.model.norm.weight = mx.ones_like(model.model.norm.weight)
    mx.eval(model.parameters())
