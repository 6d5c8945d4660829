"""Paged calls run the resident model's kernel and stay bit-exact across every threshold.

A 64-expert top-8 model puts the thresholds of mlx's dispatch at prompt lengths 8 (64 pairs:
mlx-lm sorts), 32 (256 pairs: Metal's gather_qmm_rhs on 64 experts) and 512 (4096 pairs: the
NAX 64-row tile); slot counts 1, 8, 17 and 64 move the paged side's thresholds
(4 x slots rows). Planning for Metal on CPU runs the real splitting and padding: any plan is
exact on CPU, so the logits check the passes, and the plans check the kernels.
"""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import pytest
from helpers import paged_switches

import outlier_runtime
from outlier_runtime.core.errors import ExactnessError
from outlier_runtime.engine.kernels import CPU, GPU, engine_call, kernel_for

PROMPT_TOKENS = (1, 7, 8, 9, 65, 600)
EXPERTS, TOP_K = 64, 8


@pytest.fixture(scope="module")
def model_64(tiny_cache):
    from outlier_runtime.testing.tiny_models import tiny_model

    path = tiny_model("qwen3_moe", cache_dir=tiny_cache, num_experts=EXPERTS, top_k=TOP_K, num_layers=1)
    model, tokenizer = mlx_lm.load(str(path))
    prompts = {n: mx.array([[(17 * i + 5) % 200 + 3 for i in range(n)]]) for n in PROMPT_TOKENS}
    logits = {n: model(ids) for n, ids in prompts.items()}
    mx.eval(logits)
    return path, prompts, logits


def _plan_for(runtime, backend, nax):
    switches = paged_switches(runtime)
    for switch in switches:
        switch.kernel_backend = backend
        switch.nax = nax
    return switches


RULES = [(GPU, False), (GPU, True), (CPU, False)]


@pytest.mark.parametrize("backend, nax", RULES, ids=["metal", "metal-nax", "cpu"])
@pytest.mark.parametrize("slots", [1, TOP_K, 17, EXPERTS])
def test_paged_runs_the_resident_kernel_and_matches_bit_for_bit(model_64, slots, backend, nax):
    path, prompts, logits = model_64
    runtime = outlier_runtime.load("plus", model=str(path), k_override=slots, cache_gb=1.0, force=True)
    try:
        switches = _plan_for(runtime, backend, nax)
        assert runtime.engine_stats()["config"]["slots_per_layer"] == slots
        for n, ids in prompts.items():
            resident = kernel_for(engine_call(n * TOP_K, EXPERTS, True, nax), backend)
            if slots == 1 and resident == "gather_qmm_rhs_nax_bm32":
                # With one slot every sorted call has B / E >= 64: refused, never inexact.
                with pytest.raises(ExactnessError, match="raise k_override"):
                    runtime.model(ids)
                continue
            assert mx.array_equal(runtime.model(ids), logits[n]).item(), (n, slots, backend, nax)
            for switch in switches:
                plan = switch.last_plan
                assert plan.target == resident
                assert [kernel for _, _, kernel in plan.passes] == [resident] * len(plan.passes)
                assert sum(real for real, _, _ in plan.passes) == n * TOP_K
    finally:
        runtime.close()


def test_straddling_calls_are_split_or_padded_for_metal(model_64):
    path, prompts, logits = model_64
    # 8 slots: 9 tokens = 72 pairs run gather_qmv resident (72 / 64 < 4) but would run
    # gather_qmm_rhs on 8 slots (72 / 8 >= 4): on 8 slots only unsorted calls (< 64 pairs) do.
    runtime = outlier_runtime.load("plus", model=str(path), k_override=TOP_K, cache_gb=1.0, force=True)
    try:
        (switch,) = _plan_for(runtime, GPU, nax=False)
        assert mx.array_equal(runtime.model(prompts[9]), logits[9]).item()
        assert switch.last_plan.target == "gather_qmv"
        assert all(padded < 64 for _, padded, _ in switch.last_plan.passes)
        # 65 tokens = 520 pairs run the rhs kernel resident: each group of 8 experts is one
        # sorted pass padded to at least 4 x 8 rows if it has fewer.
        assert mx.array_equal(runtime.model(prompts[65]), logits[65]).item()
        assert switch.last_plan.target == "gather_qmm_rhs"
        assert all(padded >= 64 for _, padded, _ in switch.last_plan.passes)
        assert runtime.engine_stats()["total"]["padded_rows"] > 0
    finally:
        runtime.close()


def test_cpu_plans_never_pad(model_64):
    path, prompts, logits = model_64
    runtime = outlier_runtime.load("plus", model=str(path), k_override=TOP_K, cache_gb=1.0, force=True)
    try:
        (switch,) = paged_switches(runtime)
        assert switch.kernel_backend == CPU and not switch.nax  # this machine's default device
        assert mx.array_equal(runtime.model(prompts[65]), logits[65]).item()
        assert all(real == padded for real, padded, _ in switch.last_plan.passes)
        assert runtime.engine_stats()["total"]["padded_rows"] == 0
    finally:
        runtime.close()


@pytest.mark.parametrize("slots", [1, 17])
def test_greedy_tokens_match_stock(model_64, slots):
    path, prompts, _ = model_64
    model, tokenizer = mlx_lm.load(str(path))
    prompt = prompts[9][0].tolist()
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=6)]
    runtime = outlier_runtime.load("plus", model=str(path), k_override=slots, cache_gb=1.0, force=True)
    try:
        _plan_for(runtime, GPU, nax=True)
        got = [r.token for r in mlx_lm.stream_generate(runtime.model, runtime.tokenizer, prompt, max_tokens=6)]
        assert got == expected
    finally:
        runtime.close()


def test_a_call_that_fits_the_slots_is_still_split_when_its_kernel_would_change(model_64):
    path, _, _ = model_64
    model, _ = mlx_lm.load(str(path))
    # Identical tokens route identically in a one-layer model: 20 tokens need only top-k = 8
    # experts, which fit 8 slots. But 160 pairs run gather_qmv on 64 experts (160 / 64 < 4) and
    # would run gather_qmm_rhs on 8 slots (160 / 8 >= 4): the call goes in 3 unsorted passes.
    ids = mx.array([[42] * 20])
    expected = model(ids)
    runtime = outlier_runtime.load("plus", model=str(path), k_override=TOP_K, cache_gb=1.0, force=True)
    try:
        (switch,) = _plan_for(runtime, GPU, nax=False)
        assert mx.array_equal(runtime.model(ids), expected).item()
        plan = switch.last_plan
        assert plan.target == "gather_qmv"
        assert [(real, padded) for real, padded, _ in plan.passes] == [(54, 54), (53, 53), (53, 53)]
        assert runtime.engine_stats()["layers"][0]["resident_experts"] == TOP_K
    finally:
        runtime.close()
