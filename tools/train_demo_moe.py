"""Train the embedded demo MoE offline on the Python standard library's own source.

    python tools/train_demo_moe.py --out outlier_runtime/embedded/demo-moe

Builds the corpus (stdlib .py files, validation split by file), trains a byte-level BPE on
the training split, trains a small ``qwen3_5_moe`` (Gated DeltaNet + attention, 64 experts
per layer, top-4, a shared expert) with PyTorch on the CPU, converts it with stock
``mlx_lm.convert`` to 4-bit (group 64, float32 scales and biases), checks what ``mlx_lm.load``
returns, and writes ``provenance.json``. Deterministic for a given ``--seed`` (single thread).

PyTorch trains here because it is ~15x faster than MLX's Linux CPU wheel for this model
(see provenance.json, "speed_measurements"). The run checkpoints to ``--work-dir`` every
``--checkpoint-every`` steps; ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from outlier_runtime.testing.tokenizer_training import (  # noqa: E402
    corpus_hash,
    read_texts,
    save_tokenizer,
    stdlib_python_files,
    train_tokenizer,
)

SPLIT_RULE = "validation = files whose sha256(relative path) % 10 == 0; the rest train"
DOC_SEPARATOR = "<|endoftext|>"
# The first two end inside a whitespace token: byte-level BPE learned "\n" + indentation and
# " name" as single tokens, so a prompt ending in a bare "\n" or " " is a token boundary the
# model rarely saw (it answers with column-0 code). The others end on natural boundaries.
PROMPTS = ["def fibonacci(n):\n", "import os\n\ndef ", "def fibonacci(n):", "import os\n\ndef",
           "class Stack:", "    def __init__(self"]

# Measured on the machine the shipped model was trained on (2-core AMD EPYC, one thread,
# batch 8 x 256 tokens, forward + backward + AdamW, same shape as the shipped model).
SPEED_MEASUREMENTS = {
    "torch 2.13 qwen3_5_moe, experts_implementation=grouped_mm": "740-820 tok/s",
    "torch 2.13 qwen3_5_moe, experts_implementation=eager": "300-370 tok/s",
    "torch 2.13 qwen3_moe (no shared expert, all full attention), grouped_mm": "780-1230 tok/s",
    "torch 2.13 qwen3_moe, eager": "340-515 tok/s",
    "mlx 0.32.4 (cpu) qwen3_5_moe, value_and_grad + AdamW": "39-54 tok/s",
    "mlx 0.32.4 (cpu) qwen3_moe": "57-81 tok/s",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output model directory (must not exist, or use --force)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoints and the Hugging Face export (default ~/.cache/outlier-runtime/train-demo-moe)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-size", type=int, default=128, help="moe_intermediate_size")
    p.add_argument("--shared-expert-size", type=int, default=256)
    p.add_argument("--full-attention-interval", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--mlx-eval-tokens", type=int, default=4096,
                   help="validation tokens scored with the converted 4-bit MLX model")
    p.add_argument("--val-windows", type=int, default=0,
                   help="score only this many validation windows at the end (0: all; for smoke tests)")
    p.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoint")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# --- corpus and tokens ------------------------------------------------------------------

def build_corpus():
    """(root, train files, validation files) by the deterministic file-level split."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_python_files()
    train, val = [], []
    for path in files:
        rel = str(path.relative_to(root))
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 10
        (val if bucket == 0 else train).append(path)
    return root, train, val


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents' ids, each followed by the document separator."""
    sep = tokenizer.token_to_id(DOC_SEPARATOR)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(sep)
    return np.asarray(ids, dtype=np.int64)


def unigram_cross_entropy(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of ``targets`` under the add-one-smoothed train unigram."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


def window_starts(n_tokens: int, seq_len: int) -> np.ndarray:
    """Starts of non-overlapping windows of seq_len + 1 tokens (targets are the last seq_len)."""
    return np.arange(0, n_tokens - seq_len - 1, seq_len)


def batch_for_step(step: int, stream: np.ndarray, args) -> np.ndarray:
    """The batch for ``step``: a pure function of (seed, step), so resuming replays the same data."""
    starts = window_starts(len(stream), args.seq_len)
    per_epoch = len(starts) // args.batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([args.seed, epoch]).permutation(len(starts))
    # A per-epoch random shift keeps window boundaries from repeating across epochs.
    shift = int(np.random.default_rng([args.seed, epoch, 1]).integers(0, args.seq_len))
    chosen = starts[order[index * args.batch_size:(index + 1) * args.batch_size]] + shift
    chosen = np.minimum(chosen, len(stream) - args.seq_len - 1)
    return np.stack([stream[s:s + args.seq_len + 1] for s in chosen])


# --- model ------------------------------------------------------------------------------

def text_config_dict(args, tokenizer) -> dict:
    layer_types = [
        "full_attention" if (i + 1) % args.full_attention_interval == 0 else "linear_attention"
        for i in range(args.layers)
    ]
    return dict(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        layer_types=layer_types,
        full_attention_interval=args.full_attention_interval,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_size,
        shared_expert_intermediate_size=args.shared_expert_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        router_aux_loss_coef=args.aux_loss_coef,
        output_router_logits=True,
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )


def build_model(args, tokenizer):
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(args.seed)
    config = Qwen3_5MoeTextConfig(**text_config_dict(args, tokenizer))
    config._experts_implementation = "grouped_mm"  # ~2.3x eager's speed on this CPU
    config._attn_implementation = "sdpa"
    return Qwen3_5MoeForCausalLM(config)


def make_optimizer(model, args):
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # Norm gains, the GatedDeltaNet decay parameters and routers are not weight-decayed.
        (decay if param.ndim >= 2 and "gate.weight" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def evaluate(model, stream: np.ndarray, args, max_windows: int | None = None, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping validation windows."""
    import torch

    starts = window_starts(len(stream), args.seq_len)
    if max_windows is not None:
        starts = starts[:max_windows]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            x = torch.from_numpy(np.stack([stream[s:s + args.seq_len + 1] for s in starts[i:i + batch]]))
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    model.train()
    return total / count


def train(model, train_stream, val_stream, args, work_dir: Path, started: float) -> dict:
    import torch

    optimizer = make_optimizer(model, args)
    checkpoint = work_dir / "checkpoint.pt"
    start, history, train_seconds, wall_before = 0, [], 0.0, 0.0
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, train_seconds = state["step"], state["history"], state["train_seconds"]
        # Wall time the earlier run(s) spent up to this checkpoint, so provenance counts it.
        wall_before = state.get("wall_seconds", 0.0)
        log(f"resumed at step {start}")
    model.train()
    coef = args.aux_loss_coef
    window_ce, window_aux, window_t = [], [], time.time()
    for step in range(start, args.steps):
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x = torch.from_numpy(batch_for_step(step, train_stream, args))
        out = model(input_ids=x[:, :-1])
        logits = out.logits
        ce_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        # The load-balancing loss keeps every expert in use (and so worth paging).
        loss = ce_loss + coef * out.aux_loss
        ce = ce_loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.time() - t0
        window_ce.append(ce)
        window_aux.append(out.aux_loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            rate = len(window_ce) * x[:, 1:].numel() / (time.time() - window_t)
            entry = {"step": done, "train_ce": float(np.mean(window_ce)), "aux": float(np.mean(window_aux)),
                     "lr": lr_at(step, args), "tok_per_s": round(rate), "train_seconds": round(train_seconds)}
            if done % args.eval_every == 0:
                entry["val_ce_subset"] = evaluate(model, val_stream, args, max_windows=64)
            history.append(entry)
            log(json.dumps(entry))
            window_ce, window_aux, window_t = [], [], time.time()
        if done % args.checkpoint_every == 0 or done == args.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                        "history": history, "train_seconds": train_seconds,
                        "wall_seconds": wall_before + time.time() - started}, tmp)
            os.replace(tmp, checkpoint)
    return {"history": history, "train_seconds": train_seconds, "wall_before": wall_before,
            "resumed_at_step": start if start else None}


# --- export and checks ------------------------------------------------------------------

def export_hf(model, tokenizer, args, hf_dir: Path) -> None:
    """A Hugging Face checkpoint whose config says qwen3_5_moe, the type mlx-lm routes to its loader."""
    from safetensors.torch import save_file

    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    hf_dir.mkdir(parents=True)
    # Not save_pretrained: transformers 5 writes experts back out one tensor per expert, which
    # mlx-lm's qwen3_5_moe sanitize does not read. The in-memory layout (experts.gate_up_proj
    # [E, 2I, H], experts.down_proj [E, H, I]) is the Qwen3.5 checkpoint layout it expects.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    text_config = text_config_dict(args, tokenizer)
    text_config["model_type"] = "qwen3_5_moe_text"
    text_config.pop("output_router_logits")
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text_config,
        "tie_word_embeddings": True,
        # Generation stops at the end of a chat turn and at the end of a source file.
        "eos_token_id": [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id(DOC_SEPARATOR)],
    }
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_pinned_tokenizer(tokenizer, hf_dir)


def save_pinned_tokenizer(tokenizer, out_dir: Path) -> None:
    """save_tokenizer, plus a tokenizer_config.json that makes transformers 5 use tokenizer.json as is.

    For model_type qwen3_5_moe, transformers 5 ignores ``tokenizer_class`` and builds its own
    Qwen3_5Tokenizer from our vocab and merges, with Qwen's pre-tokenizer regex and an NFC
    normalizer: different ids (20 of 22 samples differed). Its forced-class rule is skipped
    when the config has an ``auto_map``; without trust_remote_code that map is never imported
    and AutoTokenizer falls through to ``tokenizer_class`` (PreTrainedTokenizerFast, i.e.
    TokenizersBackend loading tokenizer.json unchanged). check_tokenizer verifies the result.
    """
    save_tokenizer(tokenizer, out_dir)
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "PreTrainedTokenizerFast"]}
    path.write_text(json.dumps(config, indent=2))


def convert(hf_dir: Path, mlx_dir: Path, tokenizer, quantize: bool) -> None:
    from mlx_lm import convert as mlx_convert

    if mlx_dir.exists():
        shutil.rmtree(mlx_dir)
    kwargs = {"q_group_size": 64, "q_bits": 4} if quantize else {}
    mlx_convert(hf_path=str(hf_dir), mlx_path=str(mlx_dir), quantize=quantize, dtype="float32", **kwargs)
    # mlx_lm.convert re-saves the tokenizer through transformers; ship the original files.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (mlx_dir / name).unlink(missing_ok=True)
    save_pinned_tokenizer(tokenizer, mlx_dir)


def mlx_logits_match(model, mlx_dir: Path, tokens: np.ndarray) -> float:
    """Max |torch logits - mlx logits| of the unquantized conversion: proves the weight mapping."""
    import mlx.core as mx
    import torch
    from mlx_lm import load

    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens[None])).logits[0].numpy()
    mlx_model, _ = load(str(mlx_dir))
    got = np.array(mlx_model(mx.array(tokens[None]))[0].astype(mx.float32))
    return float(np.abs(ref - got).max())


def check_tokenizer(mlx_tokenizer, tokenizer, texts: list[str]) -> dict:
    """Compare ids from mlx_lm.load's tokenizer with the raw tokenizer.json's."""
    samples = [t[:4000] for t in texts[:20]] + ["<|im_start|>user\nhi<|im_end|>\n", "naïve – ünïcødé ✓ 🐍\n\t x"]
    mismatches = [i for i, s in enumerate(samples) if mlx_tokenizer.encode(s) != tokenizer.encode(s).ids]
    return {
        "class": type(getattr(mlx_tokenizer, "_tokenizer", mlx_tokenizer)).__name__,
        "samples": len(samples),
        "mismatches": len(mismatches),
        "eos_token_ids": sorted(getattr(mlx_tokenizer, "eos_token_ids", [])),
    }


def mlx_val_ce(mlx_model, stream: np.ndarray, args, n_tokens: int) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    starts = window_starts(len(stream), args.seq_len)[: max(1, n_tokens // args.seq_len)]
    x = mx.array(np.stack([stream[s:s + args.seq_len + 1] for s in starts]))
    total = 0.0
    for i in range(0, x.shape[0], 8):
        chunk = x[i:i + 8]
        logits = mlx_model(chunk[:, :-1]).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, chunk[:, 1:], reduction="sum").item()
    return total / (len(starts) * args.seq_len)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_used": threads,
            "platform": platform.platform(), "python": platform.python_version()}


def library_versions() -> dict:
    import importlib.metadata as md

    names = ["torch", "transformers", "tokenizers", "mlx", "mlx-lm", "numpy", "safetensors"]
    return {name: md.version(name) for name in names}


# --- main -------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    work_dir = args.work_dir or Path.home() / ".cache" / "outlier-runtime" / "train-demo-moe"
    work_dir.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to replace it")

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    root, train_files, val_files = build_corpus()
    log(f"corpus: {len(train_files)} train files, {len(val_files)} validation files")
    train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    tokenizer = train_tokenizer(train_texts, vocab_size=args.vocab_size)
    train_stream = encode_stream(tokenizer, train_texts)
    val_stream = encode_stream(tokenizer, val_texts)
    log(f"tokens: train {len(train_stream)}, validation {len(val_stream)}")

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    result = train(model, train_stream, val_stream, args, work_dir, started)

    log("evaluating on the full validation split")
    val_starts = window_starts(len(val_stream), args.seq_len)[: args.val_windows or None]
    val_ce = evaluate(model, val_stream, args, max_windows=len(val_starts))
    val_targets = np.concatenate([val_stream[s + 1:s + args.seq_len + 1] for s in val_starts])
    unigram = unigram_cross_entropy(train_stream, val_targets, tokenizer.get_vocab_size())
    log(f"validation CE {val_ce:.4f} nats/token; unigram baseline {unigram:.4f}")

    hf_dir = work_dir / "hf"
    export_hf(model, tokenizer, args, hf_dir)
    float_dir = work_dir / "mlx-float32"
    convert(hf_dir, float_dir, tokenizer, quantize=False)
    logit_diff = mlx_logits_match(model, float_dir, val_stream[:128])
    log(f"torch vs unquantized mlx logits: max abs diff {logit_diff:.2e}")
    if logit_diff > 1e-2:
        raise SystemExit(f"conversion changed the model (max logit diff {logit_diff}); see {float_dir}")

    if out.exists():
        shutil.rmtree(out)
    convert(hf_dir, out, tokenizer, quantize=True)

    from mlx_lm import generate, load

    mlx_model, mlx_tokenizer = load(str(out))
    tok_check = check_tokenizer(mlx_tokenizer, tokenizer, val_texts)
    log(f"tokenizer check: {tok_check}")
    if tok_check["mismatches"]:
        raise SystemExit(f"mlx_lm.load's tokenizer encodes differently from {out / 'tokenizer.json'}")
    n_eval = args.mlx_eval_tokens
    torch_subset = evaluate(model, val_stream, args, max_windows=max(1, n_eval // args.seq_len))
    mlx_subset = mlx_val_ce(mlx_model, val_stream, args, n_eval)
    log(f"first {n_eval} validation tokens: torch float32 {torch_subset:.4f}, mlx 4-bit {mlx_subset:.4f}")
    completions = {p: generate(mlx_model, mlx_tokenizer, p, max_tokens=100) for p in PROMPTS}
    for prompt, text in completions.items():
        log(f"greedy completion of {prompt!r}:\n{prompt}{text}")

    final_train = float(np.mean([h["train_ce"] for h in result["history"][-5:]]))
    weights = sorted(out.glob("*.safetensors"))
    provenance = {
        "description": "Demo MoE trained offline on the Python standard library's own source.",
        "command": "python tools/train_demo_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "corpus": {
            "source": "Python standard library .py files (tests and idlelib excluded)",
            "stdlib_root": str(root),
            "python_version": platform.python_version(),
            "corpus_hash": corpus_hash(sorted(train_files + val_files, key=lambda p: str(p.relative_to(root)))),
            "train_hash": corpus_hash(train_files),
            "validation_hash": corpus_hash(val_files),
            "split_rule": SPLIT_RULE,
            "train_files": [str(p.relative_to(root)) for p in train_files],
            "validation_files": [str(p.relative_to(root)) for p in val_files],
            "train_tokens": int(len(train_stream)),
            "validation_tokens": int(len(val_stream)),
            "document_separator": DOC_SEPARATOR,
        },
        "tokenizer": {"kind": "byte-level BPE (tokenizers), trained on the train split",
                      "vocab_size": tokenizer.get_vocab_size(), "eos_token": "<|im_end|>",
                      "mlx_lm_load_check": tok_check,
                      "transformers5_fix": "tokenizer_config.json carries an auto_map so transformers 5 does not "
                                           "substitute Qwen3_5Tokenizer (different pre-tokenizer, NFC) for "
                                           "tokenizer.json; do not load with trust_remote_code=True"},
        "model": {"architecture": "qwen3_5_moe", "trained_with": "transformers Qwen3_5MoeForCausalLM (PyTorch, CPU)",
                  "text_config": text_config_dict(args, tokenizer), "parameters": n_params},
        "hyperparameters": {k: getattr(args, k) for k in (
            "steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay",
            "aux_loss_coef", "threads")} | {"optimizer": "AdamW(betas=(0.9, 0.95)), grad clip 1.0",
                                            "schedule": "linear warmup, cosine to min_lr_ratio"},
        "training": {"steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.seq_len,
                     "epochs": args.steps * args.batch_size * args.seq_len / len(train_stream),
                     "train_seconds": round(result["train_seconds"], 1), "history": result["history"],
                     "resumed_at_step": result["resumed_at_step"]},
        "evaluation": {
            "final_train_ce": final_train,
            "validation_ce": val_ce,
            "unigram_baseline_validation_ce": unigram,
            "units": "nats/token; unigram = add-one-smoothed train-split token frequencies scored on the same validation targets",
            "mlx_4bit_validation_ce_subset": mlx_subset,
            "torch_float32_validation_ce_subset": torch_subset,
            "subset_tokens": (n_eval // args.seq_len) * args.seq_len,
            "torch_vs_mlx_float32_max_logit_diff": logit_diff,
        },
        "greedy_completions": completions,
        "greedy_completions_note": "stock mlx_lm.generate, argmax, 100 tokens, on the 4-bit model. Prompts ending "
                                   "in a bare newline or space end mid-token for this byte-level BPE, and the small "
                                   "model falls into repetition loops after a line or two.",
        "conversion": {"tool": "mlx_lm.convert", "quantize": True, "q_group_size": 64, "q_bits": 4,
                       "dtype": "float32", "note": "routers (mlp.gate, shared_expert_gate) are 8-bit by qwen3_5's quant_predicate"},
        "size_on_disk_bytes": {"weights": sum(f.stat().st_size for f in weights)},
        "speed_measurements": SPEED_MEASUREMENTS,
        "wall_seconds": None,
        "machine": machine_info(args.threads),
        "libraries": library_versions(),
    }
    provenance["wall_seconds"] = round(result["wall_before"] + time.time() - started, 1)
    path = out / "provenance.json"
    path.write_text(json.dumps(provenance, indent=2, ensure_ascii=False))
    provenance["size_on_disk_bytes"]["directory"] = dir_size(out)
    path.write_text(json.dumps(provenance, indent=2, ensure_ascii=False))
    log(f"wrote {out} ({dir_size(out) / 1e6:.1f} MB) in {provenance['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
