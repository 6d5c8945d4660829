"""Which gather kernel mlx runs for an expert call: a pure function of the call's shapes.

Why it matters: mlx's kernels for one gathered matmul sum in different orders, so two calls
that compute the same rows give bit-identical rows only if they run the same kernel. On Metal
the choice depends on ``E``, the number of experts in the weight tensor; a paged layer
computes on a slot buffer of ``S`` rows, so ``E`` becomes ``S``. The paged switch uses
:func:`pass_row_range` to size its calls so that each runs the resident model's kernel.

Source read (facts only, no code): ml-explore/mlx at commit 846d17622 (2026-08-22, version
header 0.32.2), the newest snapshot available here; no v0.32.4 tag was in it. The threshold
``B / E >= 4`` has been in place since ec2ab4288 (#2609, 2025-09-19; earlier releases used 8).
The kernel headers shipped in the installed mlx 0.32.4 wheel show the ``gather_qmm_rhs``
kernel rewritten since that snapshot (row tiles scheduled per expert from offsets), so the
dispatch may have moved too: the rule lives in this one module, and ``outlier verify`` checks
the result on the user's own machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Backend = Literal["cpu", "gpu"]
CPU: Backend = "cpu"
#: Metal. mlx's CUDA backend is not modelled (see :func:`engine_backend`).
GPU: Backend = "gpu"

#: mlx-lm's switch layers sort token-expert pairs by expert when ``indices.size >= 64``
#: (mlx_lm/models/switch_layers.py, SwitchGLU/SwitchMLP ``do_sort``).
SORT_THRESHOLD = 64

# Metal GatherQMM::eval_gpu, mlx/backend/metal/quantized.cpp:1905:
#   gather_qmm_rhs if M == 1 && B >= 16 && right_sorted && B / E >= 4 (C++ int division).
RHS_MIN_ROWS = 16
RHS_ROWS_PER_EXPERT = 4
# quantized.cpp:1497 (gather_qmm_rhs_nax, chips with NAX): row tile bm = 32 if M / E < 64
# else 64, where M there is the number of rows (x.size() / K).
QMM_NAX_WIDE_TILE_ROWS_PER_EXPERT = 64
# Metal GatherMM::eval_gpu, mlx/backend/metal/matmul.cpp:2838: gather_mm_rhs whenever M == 1
# and right_sorted (no dependence on E); its NAX variant (matmul.cpp:2315-2323) picks the
# row tile from M / E: > 48 -> 64 rows, > 24 -> 32 rows, else 16.
MM_NAX_TILE_STEPS = ((48, 64), (24, 32))


@dataclass(frozen=True)
class GatherCall:
    """The shapes of one ``gather_qmm``/``gather_mm`` call that decide its kernel."""

    #: B: token-expert pairs, ``out.size / M / N`` (``indices.size`` for mlx-lm's calls).
    rows: int
    #: E: experts in the weight tensor (the slot count when paged).
    experts: int
    #: ``sorted_indices`` (mlx-lm passes ``rows >= SORT_THRESHOLD``).
    sorted: bool
    quantized: bool = True
    #: Rows of x per pair; mlx-lm's switch layers always pass 1 (x is expanded to [..., 1, D]).
    m: int = 1
    #: mlx-lm's switch linears call with ``transpose=True``.
    transposed: bool = True
    #: Metal's get_qmv_batch_limit(K, N, chip) (quantized.cpp:85-143, 6 to 33) for transposed
    #: weights, 4 otherwise; only needed when ``m > 1``.
    vector_limit: int | None = None
    #: The chip has NAX and the dtype takes the NAX path (quantized.cpp:1602-1603).
    nax: bool = False


def mlx_sorts(rows: int) -> bool:
    """Whether mlx-lm's switch layer sorts a call of ``rows`` token-expert pairs."""
    return rows >= SORT_THRESHOLD


def kernel_for(call: GatherCall, backend: Backend) -> str:
    """The kernel mlx runs for ``call`` on ``backend``."""
    if call.rows < 1 or call.experts < 1 or call.m < 1:
        raise ValueError(f"{call}: rows, experts and m must be positive")
    if backend == CPU:
        return _cpu_kernel(call)
    if backend == GPU:
        return _metal_qmm_kernel(call) if call.quantized else _metal_mm_kernel(call)
    raise ValueError(f"backend {backend!r}: expected {CPU!r} or {GPU!r}")


def _cpu_kernel(call: GatherCall) -> str:
    # mlx/backend/cpu/quantized.cpp:966-1040 (GatherQMM::eval_cpu) -> _bs_qmm_dispatch_typed
    # (:700-747): one loop over the pairs, each an independent M x N x K product, the inner
    # routine picked from bits, group size, dtype and transpose only. right_sorted_ is never
    # read in mlx/backend/cpu and E appears nowhere. GatherMM::eval_cpu
    # (mlx/backend/cpu/masked_mm.cpp:369) is likewise one GEMM per pair. So on CPU the kernel,
    # and each row's summation order, never depend on B, E or sorting.
    return "cpu_gather_qmm_per_pair" if call.quantized else "cpu_gather_mm_per_pair"


def _metal_qmm_kernel(call: GatherCall) -> str:
    if (call.m == 1 and call.rows >= RHS_MIN_ROWS and call.sorted
            and call.rows // call.experts >= RHS_ROWS_PER_EXPERT):
        # gather_qmm_rhs dispatches to its NAX variant only for transposed weights
        # (quantized.cpp:1602-1603).
        if call.nax and call.transposed:
            wide = call.rows // call.experts >= QMM_NAX_WIDE_TILE_ROWS_PER_EXPERT
            return "gather_qmm_rhs_nax_bm64" if wide else "gather_qmm_rhs_nax_bm32"
        return "gather_qmm_rhs"
    limit = call.vector_limit if call.vector_limit is not None else (None if call.transposed else 4)
    if call.m > 1 and limit is None:
        raise ValueError(f"{call}: m > 1 with transposed weights needs vector_limit")
    if call.m > 1 and call.m >= limit:  # quantized.cpp:1926
        return "gather_qmm"
    return "gather_qmv" if call.transposed else "gather_qvm"  # quantized.cpp:1947-1970


def _metal_mm_kernel(call: GatherCall) -> str:
    if call.m == 1 and call.sorted:
        if call.nax:
            per_expert = call.rows // call.experts
            tile = next((rows for above, rows in MM_NAX_TILE_STEPS if per_expert > above), 16)
            return f"gather_mm_rhs_nax_bm{tile}"
        return "gather_mm_rhs"
    if call.m == 1:
        return "gather_mv"  # matmul.cpp:2848
    # matmul.cpp:2852-2863: gather_mv for N == 1, else gather_mm_wide or gather_mm, chosen
    # from strides and M, N, K: never from B or E, so it cannot differ between paged and resident.
    return "gather_mm"


def engine_call(rows: int, experts: int, quantized: bool, nax: bool) -> GatherCall:
    """The call mlx-lm's switch layer makes for ``rows`` token-expert pairs."""
    return GatherCall(rows=rows, experts=experts, sorted=mlx_sorts(rows), quantized=quantized, nax=nax)


def _breakpoints(slots: int) -> list[int]:
    """Every row count at which the kernel for a slot buffer of ``slots`` rows can change."""
    points = {1, RHS_MIN_ROWS, SORT_THRESHOLD, RHS_ROWS_PER_EXPERT * slots,
              QMM_NAX_WIDE_TILE_ROWS_PER_EXPERT * slots}
    points.update((above + 1) * slots for above, _ in MM_NAX_TILE_STEPS)
    return sorted(points)


def pass_row_range(target: str, slots: int, backend: Backend, quantized: bool,
                   nax: bool) -> tuple[int, int | None] | None:
    """(fewest, most) rows a call on ``slots`` slots may have to run ``target``; None if none can.

    ``most`` is None when there is no upper bound. The kernel is constant between
    consecutive breakpoints, and the rows that select one kernel form one interval.
    """
    points = _breakpoints(slots)
    fewest = most = None
    for number, start in enumerate(points):
        end = points[number + 1] - 1 if number + 1 < len(points) else None
        if kernel_for(engine_call(start, slots, quantized, nax), backend) == target:
            if fewest is None:
                fewest = start
            most = end
        elif fewest is not None:
            break
    return None if fewest is None else (fewest, most)


def split_rows(count: int, fewest: int, most: int | None) -> list[tuple[int, int]]:
    """Cut ``count`` rows into passes of (real rows, rows after padding) within [fewest, most].

    Passes are as even as possible; a pass below ``fewest`` is padded with copies of a real row.
    """
    if count <= 0:
        return []
    passes = 1 if most is None else -(-count // most)
    base, extra = divmod(count, passes)
    sizes = [base + 1] * extra + [base] * (passes - extra)
    return [(size, max(size, fewest)) for size in sizes]


def metal_has_nax(architecture: str, macos_version: str) -> bool:
    """Whether mlx would use its NAX kernels on this Metal GPU.

    mlx/backend/metal/device.cpp:947-966 (is_nax_available): macOS 26.2 or later and an
    architecture generation of at least 17 (18 for phone chips, suffix 'p'); the generation
    is the two digits before the architecture name's last letter (device.cpp:593-601), e.g.
    ``applegpu_g17s``. A build with MLX_METAL_NO_NAX never uses them; planning as if it did
    is still exact (the NAX classes refine the plain ones), only stricter.
    """
    digits = architecture[-3:-1]
    if len(architecture) < 3 or not digits.isdigit():
        return False
    try:
        version = tuple(int(part) for part in macos_version.split(".")[:2])
    except ValueError:
        return False
    generation = int(digits)
    return version >= (26, 2) and generation >= (18 if architecture.endswith("p") else 17)


def engine_backend(device_type: str) -> Backend:
    """The planning rule for mlx's default device (``mx.default_device().type.name``).

    A GPU that is not Metal (mlx's CUDA backend) is planned with the Metal rule: its passes
    keep every Metal condition, but CUDA's own dispatch has not been checked.
    """
    return CPU if device_type == "cpu" else GPU


def device_rule() -> tuple[Backend, bool]:
    """(backend, nax) of mlx's default device: the rule its calls are planned by."""
    import platform

    import mlx.core as mx

    backend = engine_backend(mx.default_device().type.name)
    if backend != GPU or not mx.metal.is_available():
        return backend, False
    return backend, metal_has_nax(str(mx.device_info().get("architecture", "")), platform.mac_ver()[0])
