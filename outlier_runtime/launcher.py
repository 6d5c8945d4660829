"""`outlier run TIER PROMPT --hostfile hosts.json` (and `outlier serve --hostfile ...`): the same
command on every rank, through mlx.launch.

mlx's own launcher starts the ranks (over ssh, or locally for 127.0.0.1) with the environment
``mx.distributed.init()`` reads. Each rank runs ``outlier run`` (or ``serve``) again, without
``--hostfile`` and with ``paging.distributed = "pipeline"``; rank 0 prints the reply (or serves
HTTP), the others only their statistics (or follow rank 0). mlx.launch exits 0 even when a rank
failed, so its warnings are read here and a failed rank makes this command exit 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from outlier_runtime.core.errors import DistributedError

#: Options of `outlier run` that belong to the launch, not to the ranks' command; the API key is
#: a secret: a command line is readable by every local user (and goes into the ssh command).
LAUNCH_OPTIONS = ("hostfile", "backend", "starting_port", "api_key")
#: Where rank 0 finds the API key when it runs on this machine (ranks inherit the environment).
API_KEY_ENV = "OUTLIER_API_KEY"
_RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def launcher_path() -> Path:
    """mlx's ``mlx.launch`` script, installed next to this Python."""
    path = Path(sys.executable).with_name("mlx.launch")
    if not path.exists():
        raise DistributedError(f"{path} not found: mlx.launch comes with mlx; reinstall mlx in this environment")
    return path


def rank_argv(ctx: click.Context, prompt: str | None = None) -> list[str]:
    """The `outlier run` (or `outlier serve`) arguments each rank runs: the same options, the
    prompt as text (read once here, not from each rank's standard input), no launch options,
    distributed = "pipeline"."""
    argv = [ctx.info_name or "run"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            argv.append(prompt if param.name == "prompt" else str(value))
            continue
        if param.name in LAUNCH_OPTIONS or value is None or not isinstance(param, click.Option):
            continue
        if param.is_flag and param.secondary_opts:  # --chat/--raw
            argv.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                argv.append(param.opts[0])
        elif param.multiple:
            for item in value:
                argv += [param.opts[0], str(item)]
        else:
            argv += [param.opts[0], str(value)]
    return [*argv, "--set", 'paging.distributed="pipeline"']


def check_hostfile(hostfile: str) -> list[str]:
    """Refuse a hostfile mlx.launch would refuse, in one line (it answers with its usage text);
    else its hosts' ssh names, rank 0 first (mlx.launch runs "127.0.0.1" locally)."""
    fix = 'expected a JSON list of hosts like [{"ssh": "mac1", "ips": ["10.0.0.1"]}] (or {"hosts": [...]}); ' \
          "write one with mlx.distributed_config (docs/distributed.md)"
    path = Path(hostfile)
    if not path.is_file():
        raise DistributedError(f"--hostfile {hostfile}: no such file; {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DistributedError(f"--hostfile {hostfile}: not readable JSON ({exc}); {fix}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts or \
            not all(isinstance(h, dict) and isinstance(h.get("ssh"), str) for h in hosts):
        raise DistributedError(f"--hostfile {hostfile}: {fix}")
    return [h["ssh"] for h in hosts]


def launch(hostfile: str, backend: str | None, starting_port: int | None, argv: Sequence[str],
           rank_0_stops: bool = False, api_key: str | None = None) -> int:
    """Run ``outlier <argv>`` on every rank of ``hostfile`` with mlx.launch; 0 when every rank
    finished, 2 when one failed (its line from mlx.launch names the rank).

    ``rank_0_stops`` (a served pipeline): Ctrl-C stops only rank 0, which then stops the others; this
    process and mlx.launch ignore it and wait for them (mlx.launch interrupted would lose the ranks'
    last lines and report them failed), and the ranks inherit the ignoring, which the server replaces
    with its own handler on rank 0. ``api_key`` reaches rank 0 through the environment it inherits,
    so rank 0 must run here; on another host, give it ``--api-key-file`` there."""
    hosts = check_hostfile(hostfile)
    env = dict(os.environ)
    if api_key:
        if hosts[0] != "127.0.0.1":
            raise DistributedError(
                f"--api-key: rank 0 runs on {hosts[0]}, and the key would travel on its command line; write the "
                f"key to a file there (chmod 600) and pass --api-key-file PATH instead.")
        env[API_KEY_ENV] = api_key
    command: list[Any] = [launcher_path(), "--hostfile", hostfile, "--python", sys.executable]
    if backend:
        command += ["--backend", backend]
    if starting_port:
        command += ["--starting-port", str(starting_port)]
    command += ["--", "-m", "outlier_runtime.cli", *argv]
    failed = []
    if rank_0_stops:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # stdout (rank 0's reply) passes straight through; stderr is read for mlx.launch's verdicts.
    with subprocess.Popen([str(c) for c in command], stderr=subprocess.PIPE, text=True, errors="replace",
                          env=env) as process:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            match = _RANK_FAILED.search(line)
            if match:
                failed.append(int(match.group(1)))
    if process.returncode or failed:
        click.echo(f"error: rank {', '.join(map(str, sorted(set(failed)))) or '?'} failed: see its lines above",
                   err=True)
        return 2
    return 0
