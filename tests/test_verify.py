"""``outlier verify`` / ``outlier_runtime.verify()``: users check exactness on their own machine."""

from __future__ import annotations

import json

from click.testing import CliRunner

import outlier_runtime
from outlier_runtime import verification
from outlier_runtime.cli import main
from outlier_runtime.verification import Check, VerifyReport, threshold_prompt_lengths


def outlier(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_prompt_lengths_straddle_every_threshold_of_the_demo():
    # 64 experts, top-4: sort at 16 tokens, rhs at 64 (resident) and 4 x slots / 4 (paged),
    # NAX wide tile at 1024 (resident) and 16 x slots.
    assert threshold_prompt_lengths(64, 4, [1, 4, 32, 64], 2000) == \
        [1, 3, 4, 15, 16, 31, 32, 63, 64, 511, 512, 1023, 1024]
    assert threshold_prompt_lengths(64, 4, [1, 4, 32, 64], 70) == [1, 3, 4, 15, 16, 31, 32, 63, 64]


def test_verify_json_on_the_demo_is_identical_at_every_slot_count():
    result = outlier("verify", "--json", "--longest-prompt", "70", "--new-tokens", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identical"] is True
    assert (report["experts"], report["top_k"]) == (64, 4)
    assert report["slot_counts"] == [1, 4, 32, 64]  # 1, top-k, half, all
    checks = report["checks"]
    assert {c["slots"] for c in checks} == {1, 4, 32, 64}
    logits = [c for c in checks if c["kind"] == "logits"]
    # Decode (1 token), unsorted (15) and sorted (16) prefill, both sides of the rhs threshold (63, 64).
    assert {1, 15, 16, 63, 64} <= {c["prompt_tokens"] for c in logits}
    assert all(c["identical"] and c["same_kernel"] for c in logits)
    greedy = [c for c in checks if c["kind"] == "greedy"]
    assert len(greedy) == 4 and all(c["identical"] for c in greedy)


def test_verify_prints_a_table_and_a_verdict():
    result = outlier("verify", "--slots", "2", "--longest-prompt", "16", "--new-tokens", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["slots", "check", "tokens", "pairs"]
    assert any(line.split()[:3] == ["2", "logits", "16"] and line.endswith("identical") for line in lines)
    assert lines[-1].startswith("IDENTICAL: the paged engine matched stock mlx-lm bit for bit")


def test_python_api():
    report = outlier_runtime.verify(slot_counts=[3], longest_prompt=4, new_tokens=2)
    assert report.identical and report.slot_counts == [3]
    # 3 slots: the paged rhs threshold is 4 x 3 = 12 pairs = 3 tokens at top-4.
    assert [c.prompt_tokens for c in report.checks if c.kind == "logits"] == [1, 2, 3]


def test_a_difference_fails_with_exit_1(monkeypatch):
    bad = VerifyReport("m", "cpu", "0", 8, 2, [1], [
        Check(1, "logits", 8, 16, "gather_qmv", ["gather_qmv"], 1, True),
        Check(1, "logits", 9, 18, "gather_qmv", ["gather_qmm_rhs"], 1, True),  # right bits, wrong kernel
        Check(1, "greedy", 8, 16, "gather_qmv", [], 0, False),
    ])
    assert not bad.identical
    assert bad.verdict().startswith("DIFFERENT: 2 of 3 checks differ")
    monkeypatch.setattr(verification, "verify", lambda *args, **kwargs: bad)
    result = outlier("verify")
    assert result.exit_code == 1
    assert "OTHER" in result.stdout and result.stdout.splitlines()[-1].startswith("DIFFERENT")


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args in (["--model", str(tmp_path / "missing")], ["--model", str(tmp_path)], ["--slots", "0"],
                 ["--new-tokens", "0"]):
        result = outlier("verify", *args)
        assert result.exit_code == 2, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.output


def test_a_model_mlx_lm_cannot_load_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    result = outlier("verify", "--model", str(tmp_path))
    assert result.exit_code == 2
    assert str(tmp_path) in result.stderr and "mlx-lm cannot load" in result.stderr


def test_a_dense_model_is_refused_in_one_line(tiny):
    result = outlier("verify", "--model", str(tiny("llama")))
    assert result.exit_code == 2
    assert "no MoE expert layers" in result.stderr and result.stderr.count("\n") == 1
