"""`outlier chat`: multi-turn through the chat template, reusing the KV cache across turns."""

from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner

import outlier_runtime
from outlier_runtime.cli import main
from outlier_runtime.core.chat_session import ChatSession




def reply(session: ChatSession, text: str):
    chunks, pieces = session.send(text), []
    while True:
        try:
            pieces.append(next(chunks).text)
        except StopIteration as done:
            return "".join(pieces), done.value


def test_the_second_turn_prefills_only_what_the_cache_lacks(nano):
    session = ChatSession(nano, max_tokens=6, temperature=0.0)
    _, first = reply(session, "Write a function.")
    first_prompt = nano.encode([{"role": "user", "content": "Write a function."}])
    assert first.prefill_tokens == first.prompt_tokens == len(first_prompt)
    seen_by_model = first_prompt + nano.last_result.tokens

    text, second = reply(session, "Now make it faster.")
    conversation = nano.encode(session.messages[:-1])  # both user turns and the first reply
    common = len(os.path.commonprefix([seen_by_model, conversation]))
    assert second.prompt_tokens == len(conversation)
    # Only the tokens after what the model already saw are prefilled: never the first prompt again.
    assert second.prefill_tokens == len(conversation) - common
    assert second.prefill_tokens <= second.prompt_tokens - first.prompt_tokens
    # Reusing the cache changes nothing: a fresh run over the whole conversation agrees.
    assert text == nano.generate(session.messages[:-1], max_tokens=6, temperature=0.0).text


def test_clear_starts_over_without_the_cache(nano):
    session = ChatSession(nano, max_tokens=3, temperature=0.0)
    reply(session, "Hello.")
    session.clear()
    _, turn = reply(session, "Hello.")
    assert session.messages[0] == {"role": "user", "content": "Hello."} and len(session.turns) == 1
    assert turn.prefill_tokens == turn.prompt_tokens


def test_the_repl_reads_stdin_and_prints_tok_s_per_turn(tiny):
    lines = ["Write a function.", "/stats", "Now make it faster.", "/clear", "/nope", "/exit", "never read"]
    result = CliRunner().invoke(main, ["chat", "nano", "--model", str(tiny("llama")), "--force", "--max-tokens", "4",
                                       "--temp", "0"], input="\n".join(lines) + "\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    turns = re.findall(r"-- 4 tokens, [\d.]+ tok/s; prefilled (\d+) new of (\d+) tokens", result.stderr)
    assert len(turns) == 2  # the line after /exit is never sent
    (new1, all1), (new2, all2) = [(int(a), int(b)) for a, b in turns]
    assert new1 == all1 and all2 > all1 and new2 < all2 - all1 + 4
    assert "-- 1 turn(s)" in result.stderr and "-- new conversation" in result.stderr
    assert "unknown command /nope" in result.stderr
    assert result.stdout.count(">>> ") == 6


def test_chat_refuses_a_bad_flag_before_loading():
    result = CliRunner().invoke(main, ["chat", "nano", "--max-tokens", "0"], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr == "error: max_tokens (--max-tokens): got 0, expected a number >= 1.\n"
