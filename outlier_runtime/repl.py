"""`outlier chat`: the read-eval-print loop over a ChatSession (history, /exit, /clear, /stats)."""

from __future__ import annotations

import sys
from typing import Callable

import click

from outlier_runtime.core.chat_session import ChatSession
from outlier_runtime.core.errors import ParameterError

HELP = "/exit (or Ctrl-D) leaves, /clear starts a new conversation, /stats shows numbers, /help this."


def enable_history() -> None:
    """Line editing and a history kept in $OUTLIER_HOME/chat_history, where readline exists."""
    if not sys.stdin.isatty():
        return  # piped input: nothing to edit, and readline would write escape codes
    try:
        import atexit
        import readline
    except ImportError:  # Windows without pyreadline: input() still works, without history
        return
    from outlier_runtime.core.catalog import outlier_home

    history = outlier_home() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(save)


def run_repl(session: ChatSession, read_line: Callable[[str], str] = input) -> None:
    """Read messages until /exit or end of input; stream each reply and its tok/s."""
    runtime = session.runtime
    click.echo(f"-- chatting with {runtime.manifest.tier.display_name} ({runtime.name}). {HELP}", err=True)
    while True:
        try:
            line = read_line(">>> ").strip()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line):
                return
            continue
        _turn(session, line)


def _command(session: ChatSession, line: str) -> bool:
    """Run a /command; False means leave."""
    name = line.split()[0]
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/clear":
        session.clear()
        click.echo("-- new conversation", err=True)
    elif name == "/stats":
        _print_stats(session)
    elif name == "/help":
        click.echo(HELP, err=True)
    else:
        click.echo(f"-- unknown command {name}. {HELP}", err=True)
    return True


def _turn(session: ChatSession, text: str) -> None:
    try:
        chunks = session.send(text)
        while True:
            try:
                click.echo(next(chunks).text, nl=False)
            except StopIteration as done:
                turn = done.value
                break
    except KeyboardInterrupt:
        chunks.close()
        click.echo("\n-- stopped", err=True)
        return
    except ParameterError as exc:  # e.g. the conversation outgrew the context window
        click.echo(f"error: {exc} (/clear starts over)", err=True)
        return
    click.echo()
    click.echo(f"-- {turn.generation_tokens} tokens, {turn.generation_tps:.1f} tok/s; prefilled "
               f"{turn.prefill_tokens} new of {turn.prompt_tokens} tokens", err=True)


def _print_stats(session: ChatSession) -> None:
    turns = session.turns
    if not turns:
        click.echo("-- no turns yet", err=True)
        return
    last = turns[-1]
    click.echo(f"-- {len(turns)} turn(s), {last.prompt_tokens + last.generation_tokens} tokens in the "
               f"conversation (context window {session.runtime.manifest.generation.context_window}); "
               f"prefilled {sum(t.prefill_tokens for t in turns)} tokens and generated "
               f"{sum(t.generation_tokens for t in turns)} in all", err=True)
    click.echo(f"-- last turn: prefill {last.prefill_tokens} tokens at {last.prompt_tps:.1f} tok/s, "
               f"decode {last.generation_tokens} at {last.generation_tps:.1f} tok/s ({last.finish_reason})",
               err=True)
