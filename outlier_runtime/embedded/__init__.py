"""Models shipped inside the package, so the README's main command needs no download."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError

DEMO_MOE = Path(__file__).with_name("demo-moe")


def demo_moe_path() -> Path:
    """The embedded demo MoE (trained on the Python standard library), in mlx-lm's format."""
    if not (DEMO_MOE / "config.json").is_file():
        raise ModelNotFoundError(
            f"The embedded demo model is missing from {DEMO_MOE}. Reinstall outlier-runtime, or "
            f"rebuild it with `python tools/train_demo_moe.py --out {DEMO_MOE}`."
        )
    return DEMO_MOE
