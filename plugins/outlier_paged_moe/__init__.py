"""Built-in loader ``paged_moe``: exact, memory-bounded expert paging on stock mlx-lm (Plus)."""

from outlier_runtime import hookimpl

from .loader import PagedMoELoader
from .options import PagedMoEOptions


@hookimpl
def register_loaders(register):
    register("paged_moe", PagedMoELoader, "Experts paged from disk into bounded slots; bit-exact.",
             options=PagedMoEOptions, manifest_table="paging")
