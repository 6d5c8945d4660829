"""No traceback from any command: every subcommand, given typical wrong input, answers with one
line and exit status 2 (1 for an unexpected failure, with a pointer to -v)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from outlier_runtime.cli import main

NOWHERE = "/nonexistent/outlier-model"

#: Wrong input per subcommand; EMPTY is a directory without config.json. None of these loads a model.
BAD_INPUTS: dict[str, list[list[str]]] = {
    "tiers": [["--bogus"], ["extra"]],
    "info": [["nosuch"], [], ["plus", "--json", "--bogus"]],
    "run": [["nano", ""], ["nano", "hi", "--max-tokens", "-5"], ["nano", "hi", "--temp", "-1"],
            ["nano", "hi", "--top-p", "5"], ["nano", "hi", "--seed", "-1"], ["nosuch", "hi"],
            ["nano", "hi", "--model", NOWHERE, "--force"], ["nano", "hi", "--model", "EMPTY", "--force"],
            ["nano", "hi", "--model", "org/not-downloaded", "--force"], ["nano", "hi", "--set", "novalue"],
            ["plus", "hi", "--k-override", "0"], ["nano", "hi", "--max-tokens", "many"], ["nano"],
            ["plus", "hi", "--hostfile", NOWHERE], ["plus", "hi", "--hostfile", "NOTJSON"],
            ["nano", "hi", "--top-k", "-2"], ["nano", "hi", "--min-p", "2"], ["nano", "hi", "--repetition-penalty", "-1"]],
    "demo": [["--max-tokens", "-5"], ["--k-override", "0"], ["--cache-policy", "telepathy"]],
    "serve": [["--tier-override", f"nano={NOWHERE}"], ["--tier-override", "garbage"], ["--model", "x"],
              ["--tier-override", "nano.cache_size=3"], ["--port", "http"], ["--port", "70000"],
              ["--port", "-1"]],
    "plugins": [["--bogus"]],
    "schema": [["extra"]],
    "new-tier": [["Bad Name!"], ["mine", "--from", "nosuch"], []],
    "routing": [[NOWHERE], ["EMPTY"], ["embedded:nosuch"], ["--max-tokens", "0"], ["--out", "/proc/nope"]],
    "make-tiny": [["nosuch", "OUT"], ["llama"]],
    "pack": [["EMPTY"], [NOWHERE], ["embedded:nosuch"], ["org/not-downloaded"]],
    "bench": [["--layers", "0"], ["--repeat", "0"], ["--tokens", "0"], ["--k-override", "-1"]],
    "sweep-k": [["--layers", "0"], ["--k", "0"], ["--tokens", "0"]],
    "pull": [["nosuch"], [], ["nano"], ["org/not-downloaded"]],  # the last two: offline
    "rm": [["nosuch"], []],
    "chat": [["nosuch"], ["nano", "--temp", "-1"], ["nano", "--model", "EMPTY", "--force"], []],
    "verify": [["--model", NOWHERE], ["--model", "EMPTY"], ["--slots", "0"]],
}


def test_every_subcommand_has_bad_inputs_here():
    assert set(BAD_INPUTS) == set(main.commands), "add the new command's wrong inputs to BAD_INPUTS"


@pytest.mark.parametrize("command, args", [(c, a) for c, cases in BAD_INPUTS.items() for a in cases],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v) or "(none)")
def test_bad_input_is_one_error_line_and_exit_2(tmp_path: Path, command: str, args: list[str]):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hosts.json").write_text('{"hosts": "not a list"}')
    args = [{"EMPTY": str(tmp_path / "empty"), "OUT": str(tmp_path / "out"),
             "NOTJSON": str(tmp_path / "hosts.json")}.get(a, a) for a in args]
    result = CliRunner().invoke(main, [command, *args], catch_exceptions=False)
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, result.stderr


def test_a_malformed_environment_variable_stops_every_command(monkeypatch):
    monkeypatch.setenv("OUTLIER_MMAP_EXPERTS", "maybe")
    result = CliRunner().invoke(main, ["schema"], catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_an_unexpected_failure_is_one_line_and_exit_1_and_v_shows_the_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("outlier_runtime.tiers", broken)
    result = CliRunner().invoke(main, ["tiers"], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr == "error: RuntimeError: disk on fire (run with -v for the traceback)\n"
    verbose = CliRunner().invoke(main, ["-v", "tiers"], catch_exceptions=False)
    assert verbose.exit_code == 1
    assert "Traceback (most recent call last)" in verbose.stderr and "disk on fire" in verbose.stderr
    # -v typed after the subcommand means the same; after `--` it is an argument, not a flag.
    after = CliRunner().invoke(main, ["tiers", "-v"], catch_exceptions=False)
    assert after.exit_code == 1 and "Traceback (most recent call last)" in after.stderr


def test_v_as_an_options_value_stays_its_value():
    result = CliRunner().invoke(main, ["run", "nano", "hi", "--model", "-v"], catch_exceptions=False)
    # "-v" reached --model as its value (and is not a model directory): one line, exit 2.
    assert result.exit_code == 2 and "model path -v does not exist" in result.stderr


def test_v_after_double_dash_stays_an_argument():
    result = CliRunner().invoke(main, ["run", "nano", "--model", "/nonexistent/x", "--", "-v"],
                                catch_exceptions=False)
    # The prompt "-v" reaches `run`, which then fails on the missing model (one line, exit 2).
    assert result.exit_code == 2 and "/nonexistent/x does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unexpected_failure_without_a_message_names_its_type(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError()

    monkeypatch.setattr("outlier_runtime.tiers", broken)
    result = CliRunner().invoke(main, ["tiers", "--json"], catch_exceptions=False)
    assert result.exit_code == 1 and result.stderr == "error: KeyError (run with -v for the traceback)\n"
