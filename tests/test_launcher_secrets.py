"""The API key of a served pipeline never goes into a command line (every local user can read
/proc/*/cmdline, and mlx.launch puts a remote rank's command into its ssh command line)."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from outlier_runtime import launcher
from outlier_runtime.cli import main, serve
from outlier_runtime.core.errors import DistributedError

from helpers import free_port

SECRET = "s3cret-key-never-in-argv"


def _serve_argv(*args: str) -> list[str]:
    """The command each rank would run for `outlier serve ARGS`."""
    with click.Context(serve, info_name="serve") as ctx:
        serve.parse_args(ctx, list(args))
        return launcher.rank_argv(ctx)


def test_rank_argv_never_carries_the_api_key(monkeypatch):
    assert SECRET not in " ".join(_serve_argv("--api-key", SECRET, "--tier", "plus"))
    monkeypatch.setenv("OUTLIER_API_KEY", SECRET)
    argv = _serve_argv("--tier", "plus")
    assert SECRET not in " ".join(argv) and "--api-key" not in argv
    assert argv[:1] == ["serve"] and "--tier" in argv  # the other options still travel


def _hostfile(tmp_path, first: str) -> str:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([{"ssh": first, "ips": ["10.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]))
    return str(path)


def test_a_key_for_a_remote_rank_0_is_refused_before_anything_starts(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: started.append(a))
    with pytest.raises(DistributedError, match="--api-key-file"):
        launcher.launch(_hostfile(tmp_path, "mac1"), None, None, ["serve"], api_key=SECRET)
    assert started == []


def test_a_key_for_a_local_rank_0_travels_in_the_environment_only(tmp_path, monkeypatch):
    seen = {}

    class Recorder:
        returncode = 0
        stderr = iter(())

        def __init__(self, command, **kwargs):
            seen["command"], seen["env"] = command, kwargs["env"]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(launcher.subprocess, "Popen", Recorder)
    assert launcher.launch(_hostfile(tmp_path, "127.0.0.1"), None, None, ["serve"], api_key=SECRET) == 0
    assert seen["env"][launcher.API_KEY_ENV] == SECRET
    assert SECRET not in " ".join(seen["command"])


@pytest.mark.parametrize("content, message", [("", "first line is empty"), (None, "cannot read it"),
                                              ("\x00" * 8, "printable ASCII")])
def test_api_key_file_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(main, ["serve", "--api-key-file", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_api_key_file_and_a_key_together_are_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text(SECRET + "\n")
    result = CliRunner().invoke(main, ["serve", "--api-key-file", str(path), "--api-key", "other"],
                                catch_exceptions=False)
    assert result.exit_code == 2 and "one way" in result.stderr


def test_the_key_file_is_the_servers_key(tmp_path, monkeypatch):
    path = tmp_path / "key"
    path.write_text(SECRET + "\nignored second line\n")
    configs = []
    monkeypatch.setattr("outlier_runtime.serve.server.serve", configs.append)
    monkeypatch.delenv("OUTLIER_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", "--api-key-file", str(path), "--port", str(free_port())],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert configs[0].api_key == SECRET
