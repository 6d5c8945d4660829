"""The kernel planner: mlx's dispatch rule as a table, and pass sizes that keep the kernel.

Rows of the table are written from ml-explore/mlx 846d17622 (see outlier_runtime/engine/kernels.py):
mlx/backend/metal/quantized.cpp:1905 (gather_qmm_rhs if M == 1, B >= 16, sorted, B / E >= 4),
:1497 (NAX row tile 32 if B / E < 64 else 64), :1926 (gather_qmm if M >= vector_limit),
mlx/backend/metal/matmul.cpp:2838-2863 (GatherMM), :2315-2323 (its NAX row tile),
mlx/backend/cpu/quantized.cpp:700-747 and cpu/masked_mm.cpp:369 (one product per pair).
"""

from __future__ import annotations

import pytest

from outlier_runtime.engine.kernels import (
    CPU,
    GPU,
    GatherCall,
    engine_backend,
    engine_call,
    kernel_for,
    metal_has_nax,
    pass_row_range,
    split_rows,
)

METAL_QUANTIZED = [
    # rows, experts, sorted, nax, expected
    (1, 64, False, False, "gather_qmv"),          # decode, top-1
    (8, 64, False, False, "gather_qmv"),          # decode, top-8
    (56, 64, False, False, "gather_qmv"),         # 7 tokens x 8: unsorted prefill
    (64, 64, True, False, "gather_qmv"),          # sorted but B / E = 1 < 4
    (255, 64, True, False, "gather_qmv"),         # B / E = 3 (integer division)
    (256, 64, True, False, "gather_qmm_rhs"),     # B / E = 4
    (4800, 64, True, False, "gather_qmm_rhs"),
    (256, 64, False, False, "gather_qmv"),        # unsorted never takes the rhs kernel
    (15, 1, True, False, "gather_qmv"),           # B < 16
    (16, 1, True, False, "gather_qmm_rhs"),       # B >= 16, B / E = 16
    (16, 4, True, False, "gather_qmm_rhs"),       # B / E = 4 exactly
    (16, 5, True, False, "gather_qmv"),           # B / E = 3
    (64, 8, True, False, "gather_qmm_rhs"),       # paged: 8 slots turn the resident qmv into rhs
    (256, 64, True, True, "gather_qmm_rhs_nax_bm32"),
    (4095, 64, True, True, "gather_qmm_rhs_nax_bm32"),  # B / E = 63
    (4096, 64, True, True, "gather_qmm_rhs_nax_bm64"),  # B / E = 64
    (255, 64, True, True, "gather_qmv"),
]


@pytest.mark.parametrize("rows, experts, is_sorted, nax, expected", METAL_QUANTIZED)
def test_metal_gather_qmm_dispatch(rows, experts, is_sorted, nax, expected):
    assert kernel_for(GatherCall(rows, experts, is_sorted, nax=nax), GPU) == expected


def test_metal_gather_qmm_matrix_and_untransposed_paths():
    assert kernel_for(GatherCall(8, 64, False, m=6, vector_limit=6), GPU) == "gather_qmm"
    assert kernel_for(GatherCall(8, 64, False, m=5, vector_limit=6), GPU) == "gather_qmv"
    assert kernel_for(GatherCall(8, 64, False, transposed=False), GPU) == "gather_qvm"
    assert kernel_for(GatherCall(8, 64, False, m=4, transposed=False), GPU) == "gather_qmm"
    # The rhs kernel needs M == 1, and NAX only serves transposed weights.
    assert kernel_for(GatherCall(256, 4, True, m=2, vector_limit=6), GPU) == "gather_qmv"
    assert kernel_for(GatherCall(256, 4, True, transposed=False, nax=True), GPU) == "gather_qmm_rhs"
    with pytest.raises(ValueError, match="vector_limit"):
        kernel_for(GatherCall(8, 64, False, m=2), GPU)


METAL_FLOAT = [
    (8, 64, False, False, "gather_mv"),
    (4800, 64, False, False, "gather_mv"),
    (64, 64, True, False, "gather_mm_rhs"),       # sorted: rhs whatever B / E
    (64, 1, True, False, "gather_mm_rhs"),
    (64, 64, True, True, "gather_mm_rhs_nax_bm16"),
    (1600, 64, True, True, "gather_mm_rhs_nax_bm32"),   # B / E = 25 > 24
    (1599, 64, True, True, "gather_mm_rhs_nax_bm16"),   # B / E = 24
    (3136, 64, True, True, "gather_mm_rhs_nax_bm64"),   # B / E = 49 > 48
    (3135, 64, True, True, "gather_mm_rhs_nax_bm32"),   # B / E = 48
]


@pytest.mark.parametrize("rows, experts, is_sorted, nax, expected", METAL_FLOAT)
def test_metal_gather_mm_dispatch(rows, experts, is_sorted, nax, expected):
    assert kernel_for(GatherCall(rows, experts, is_sorted, quantized=False, nax=nax), GPU) == expected


def test_metal_gather_mm_matrix_path():
    assert kernel_for(GatherCall(8, 64, True, quantized=False, m=3), GPU) == "gather_mm"


def test_cpu_kernel_depends_on_neither_rows_nor_experts_nor_sorting():
    calls = [GatherCall(rows, experts, is_sorted, quantized=q)
             for rows in (1, 15, 16, 63, 64, 255, 256, 4800) for experts in (1, 8, 64, 512)
             for is_sorted in (False, True) for q in (False, True)]
    assert {kernel_for(c, CPU) for c in calls if c.quantized} == {"cpu_gather_qmm_per_pair"}
    assert {kernel_for(c, CPU) for c in calls if not c.quantized} == {"cpu_gather_mm_per_pair"}


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="backend"):
        kernel_for(GatherCall(8, 64, False), "metal")
    with pytest.raises(ValueError, match="positive"):
        kernel_for(GatherCall(0, 64, False), GPU)


def test_engine_backend():
    assert engine_backend("cpu") == CPU
    assert engine_backend("gpu") == GPU


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("nax", [True, False])
@pytest.mark.parametrize("backend", [GPU, CPU])
def test_pass_row_range_is_exactly_the_rows_that_run_the_target(quantized, nax, backend):
    # Brute force over every row count: the range must hold all and only the matching ones.
    for slots in (1, 2, 3, 8, 16, 17, 20, 64):
        limit = 70 * slots + 100
        kernels = [kernel_for(engine_call(n, slots, quantized, nax), backend) for n in range(1, limit)]
        for target in set(kernels):
            fewest, most = pass_row_range(target, slots, backend, quantized, nax)
            matching = [n for n, k in enumerate(kernels, start=1) if k == target]
            assert matching[0] == fewest
            assert matching == list(range(fewest, (most if most is not None else limit - 1) + 1))
            assert (most is None) == (matching[-1] == limit - 1)


def test_a_kernel_no_slot_count_can_run_has_no_range():
    # One slot: every sorted call has B / E >= 64, so the NAX 32-row tile is out of reach.
    assert pass_row_range("gather_qmm_rhs_nax_bm32", 1, GPU, True, True) is None
    assert pass_row_range("gather_qmm_rhs_nax_bm32", 2, GPU, True, True) == (64, 127)


@pytest.mark.parametrize("count, fewest, most, expected", [
    (1, 1, 63, [(1, 1)]),
    (63, 1, 63, [(63, 63)]),
    (64, 1, 63, [(32, 32), (32, 32)]),
    (130, 1, 63, [(44, 44), (43, 43), (43, 43)]),
    (10, 256, None, [(10, 256)]),
    (5000, 256, None, [(5000, 5000)]),
    (300, 68, 127, [(100, 100), (100, 100), (100, 100)]),
    (5, 64, 127, [(5, 64)]),
    (0, 1, 63, []),
])
def test_split_rows(count, fewest, most, expected):
    passes = split_rows(count, fewest, most)
    assert passes == expected
    assert sum(real for real, _ in passes) == count
    assert all(fewest <= padded and (most is None or padded <= most) for _, padded in passes)


@pytest.mark.parametrize("architecture, macos, expected", [
    ("applegpu_g17s", "26.2", True),
    ("applegpu_g17s", "26.1", False),
    ("applegpu_g17s", "27.0", True),
    ("applegpu_g16s", "26.2", False),
    ("applegpu_g17p", "26.2", False),   # phones need generation 18
    ("applegpu_g18p", "26.2", True),
    ("x86_64", "", False),
    ("", "26.2", False),
])
def test_metal_has_nax(architecture, macos, expected):
    assert metal_has_nax(architecture, macos) is expected
