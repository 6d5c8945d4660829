"""The embedded demo MoE: the README's main command works, and paging it is exact."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
from click.testing import CliRunner

import outlier_runtime
from outlier_runtime.cli import main
from outlier_runtime.embedded import demo_moe_path

PROMPT = "def read_file(path):\n    with open(path) as f:\n"


def test_demo_command_prints_a_completion_and_paging_stats():
    result = CliRunner().invoke(main, ["demo", "--max-tokens", "24", "--prompt", PROMPT])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PROMPT)
    assert len(result.stdout) > len(PROMPT) + 10
    assert "-- paging:" in result.stderr and "misses" in result.stderr


def test_paged_demo_is_token_identical_to_stock_mlx_lm():
    path = demo_moe_path()
    model, tokenizer = mlx_lm.load(str(path))
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=32)]
    if expected[-1] in tokenizer.eos_token_ids:
        expected.pop()  # stock reports the end-of-sequence token; our result's tokens exclude it
    ids = mx.array(tokenizer.encode(PROMPT * 4))[None]
    reference = model(ids)
    with outlier_runtime.load("plus", model="embedded:demo-moe", k_override=4, cache_gb=0.002,
                              force=True) as runtime:
        result = runtime.generate(PROMPT, max_tokens=32, temperature=0.0, chat=False)
        assert result.tokens == expected
        assert result.engine["total"]["misses"] > 0  # only part of the experts fit: it really pages
        assert mx.array_equal(runtime.model(ids), reference).item()
