"""Models shipped inside the package: the demo MoE trained on the standard library's source."""

from __future__ import annotations

from pathlib import Path

from outlier_runtime.core.errors import ModelNotFoundError

DEMO_MOE_DIR = Path(__file__).resolve().parent / "demo-moe"
#: ``model = "embedded:demo-moe"`` in a manifest or ``--model embedded:demo-moe`` names it.
SCHEME = "embedded:"


def demo_moe_path() -> Path:
    """The embedded demo MoE's directory (4-bit qwen3_5_moe, loadable with ``mlx_lm.load``)."""
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json")
               if not (DEMO_MOE_DIR / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"The embedded demo model is incomplete: {DEMO_MOE_DIR} lacks {', '.join(missing)}. "
            f"Reinstall outlier-runtime, or rebuild the model with "
            f"`python tools/train_demo_moe.py --out {DEMO_MOE_DIR}`."
        )
    return DEMO_MOE_DIR


def embedded_model(reference: str) -> Path:
    """Resolve ``embedded:NAME`` to a model shipped in the package."""
    name = reference[len(SCHEME):]
    if name != DEMO_MOE_DIR.name:
        raise ModelNotFoundError(f"No embedded model {name!r}; the package ships {SCHEME}{DEMO_MOE_DIR.name}.")
    return demo_moe_path()
