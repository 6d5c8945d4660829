"""One validation path for generation parameters: the same bounds and message from Python,
the CLI and the environment, checked before a model is loaded where possible."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import outlier_runtime
from outlier_runtime import ParameterError
from outlier_runtime.cli import main
from outlier_runtime.core.env_flags import env_flag
from outlier_runtime.core.params import MAX_SEED, check_generation, token_budget


def outlier(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


BAD = [
    ("max_tokens", -5, "max_tokens (--max-tokens): got -5, expected a number >= 1."),
    ("max_tokens", 0, "max_tokens (--max-tokens): got 0, expected a number >= 1."),
    ("temperature", -1.0, "temperature (--temp): got -1.0, expected a number >= 0"),
    ("top_p", 5.0, "top_p (--top-p): got 5.0, expected a number <= 1"),
    ("top_p", 0.0, "top_p (--top-p): got 0.0, expected a number > 0"),
    ("seed", -1, "seed (--seed): got -1, expected a number >= 0."),
    ("seed", MAX_SEED + 1, f"seed (--seed): got {MAX_SEED + 1}, expected a number <= {MAX_SEED}."),
]


@pytest.mark.parametrize("name, value, message", BAD)
def test_an_out_of_range_parameter_is_one_line_naming_it_and_its_flag(name, value, message):
    with pytest.raises(ParameterError) as caught:
        check_generation("hello", **{name: value})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert caught.value.param == name


@pytest.mark.parametrize("prompt", ["", []])
def test_an_empty_prompt_is_refused(prompt):
    with pytest.raises(ParameterError, match=r"^prompt: empty; give some text"):
        check_generation(prompt)


def test_the_limits_themselves_are_accepted():
    params = check_generation([{"role": "user", "content": "hi"}], max_tokens=1, temperature=0.0,
                              top_p=1.0, seed=MAX_SEED)
    assert (params.max_tokens, params.top_p, params.seed) == (1, 1.0, MAX_SEED)


def test_the_token_budget_stays_inside_the_context_window():
    assert token_budget(prompt_tokens=10, requested=None, default=256, context_window=100) == 90
    assert token_budget(prompt_tokens=10, requested=90, default=256, context_window=100) == 90
    with pytest.raises(ParameterError, match=r"^max_tokens \(--max-tokens\): 91 plus the prompt's 10 tokens "
                                             r"exceeds the context window of 100 tokens; ask for at most 90"):
        token_budget(prompt_tokens=10, requested=91, default=256, context_window=100)
    with pytest.raises(ParameterError, match=r"^prompt: 100 tokens leave no room") as caught:
        token_budget(prompt_tokens=100, requested=None, default=256, context_window=100)
    assert caught.value.param == "prompt"




@pytest.mark.parametrize("name, value, message", BAD[:1] + BAD[2:4])
def test_python_and_the_cli_refuse_with_the_same_message(nano, tiny, name, value, message):
    with pytest.raises(ParameterError) as caught:
        nano.generate("def f(", **{name: value})
    flag = {"max_tokens": "--max-tokens", "temperature": "--temp", "top_p": "--top-p"}[name]
    result = outlier("run", "nano", "def f(", "--model", str(tiny("llama")), "--force", flag, str(value))
    assert result.exit_code == 2
    assert result.stderr == f"error: {caught.value}\n"


def test_a_huge_max_tokens_is_checked_against_the_context_window(nano):
    with pytest.raises(ParameterError, match=r"exceeds the context window of 32768 tokens"):
        nano.generate("def f(", max_tokens=10**9, chat=False)
    # The default budget is shortened to fit instead.
    assert nano.generate("def f(", max_tokens=3, chat=False).generation_tokens == 3


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                             ("0", False), ("false", False), ("no", False), ("Off", False),
                                             ("", None)])
def test_boolean_environment_variables_take_the_usual_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("OUTLIER_MMAP_EXPERTS", value)
    assert env_flag("OUTLIER_MMAP_EXPERTS") is expected


def test_a_malformed_boolean_environment_variable_is_one_line_everywhere(monkeypatch):
    monkeypatch.setenv("OUTLIER_MMAP_EXPERTS", "maybe")
    with pytest.raises(ParameterError, match=r"OUTLIER_MMAP_EXPERTS='maybe': expected 1/0, true/false"):
        outlier_runtime.load("plus")
    with pytest.raises(ParameterError, match=r"OUTLIER_MMAP_EXPERTS='maybe'"):
        outlier_runtime.tiers()
    result = outlier("tiers", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: environment variable OUTLIER_MMAP_EXPERTS='maybe'")
    assert len(result.stderr.splitlines()) == 1


def test_more_experts_per_token_than_the_model_has_is_one_line(tiny):
    model = str(tiny("qwen3_moe"))
    with pytest.raises(ParameterError, match=r"experts_per_token \(--experts-per-token\) is 100, but .* has "
                                             r"\d+ experts per layer; choose 1 to \d+"):
        outlier_runtime.load("plus", model=model, experts_per_token=100, force=True)
    result = outlier("run", "plus", "def f(", "--model", model, "--force", "--experts-per-token", "100")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["max_tokens", "temperature", "top_p"])
def test_the_bounds_are_the_manifests_own(name):
    from outlier_runtime.core.manifest import GenerationSection
    from outlier_runtime.core.params import GenerationParams

    assert GenerationParams.model_fields[name].metadata == GenerationSection.model_fields[name].metadata


def test_load_overrides_get_the_same_check_as_call_parameters():
    with pytest.raises(ParameterError) as caught:
        outlier_runtime.load("nano", max_tokens=-5)
    assert str(caught.value) == "max_tokens (--max-tokens): got -5, expected a number >= 1."
    with pytest.raises(ParameterError, match=r"^seed \(--seed\): got -1"):
        outlier_runtime.load("nano", seed=-1)
