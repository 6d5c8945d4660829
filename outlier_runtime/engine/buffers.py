"""Page-aligned host buffers, so reads can use O_DIRECT and land where the engine wants them."""

from __future__ import annotations

import numpy as np

#: 16 KiB: Apple Silicon's page size, and a multiple of every x86 and disk block size.
DEFAULT_ALIGNMENT = 16384
#: The alignment O_DIRECT needs for offsets, lengths and buffer addresses on common filesystems.
DIRECT_IO_ALIGNMENT = 4096


def round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def aligned_empty(nbytes: int, alignment: int = DEFAULT_ALIGNMENT) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` whose first byte is ``alignment``-aligned."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    shift = (-raw.ctypes.data) % alignment
    return raw[shift:shift + nbytes]
