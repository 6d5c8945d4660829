"""outlier-runtime: local language-model tiers on MLX, with a paged, exact MoE engine."""

from .hookspecs import hookimpl

__all__ = ["hookimpl"]
