"""Built-in readers: ``pread`` (the product's seek+read baseline) and ``mmap``."""

from outlier_runtime import hookimpl

from .mmap_reader import MmapReader
from .pread_reader import PreadReader


@hookimpl
def register_readers(register):
    register("pread", PreadReader, "One positional read per tensor range (the product's baseline).")
    register("mmap", MmapReader, "Copy from a memory map; the OS pages the file in on fault.")
