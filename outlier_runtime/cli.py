"""The ``outlier`` command line. Every listing command takes ``--json`` for programs."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from outlier_runtime.core.errors import OutlierError, ParameterError


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


class _Group(click.Group):
    """No traceback from any command: the project's errors are one line and exit 2, anything
    unexpected one line and exit 1 (``-v`` prints the traceback too)."""

    VERBOSE_FLAGS = ("-v", "-vv", "--verbose")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `-v` belongs to the group, but people type it after the subcommand too
        # (`outlier run nano "hi" -v`); move it to the front. `--` ends options, as usual, and a
        # `-v` that is the value of an option (`--stop -v`) stays where it is.
        end = args.index("--") if "--" in args else len(args)
        command = next((self.commands.get(arg) for arg in args[:end] if not arg.startswith("-")), None)
        takes_value = {opt for param in getattr(command, "params", ()) if isinstance(param, click.Option)
                       and not param.is_flag and not param.count for opt in param.opts + param.secondary_opts}
        hoisted, rest = [], []
        for index, arg in enumerate(args[:end]):
            is_value = index > 0 and args[index - 1] in takes_value
            (hoisted if arg in self.VERBOSE_FLAGS and not is_value else rest).append(arg)
        return super().parse_args(ctx, hoisted + rest + args[end:])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OutlierError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click prints these itself (usage errors: exit 2)
        except Exception as exc:
            if ctx.params.get("verbose"):
                click.echo(traceback.format_exc(), err=True, nl=False)
            detail = f": {str(exc).splitlines()[0]}" if str(exc).strip() else ""
            click.echo(f"error: {type(exc).__name__}{detail} (run with -v for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="outlier-runtime", prog_name="outlier")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug); -v also shows tracebacks.")
def main(verbose: int) -> None:
    """Run local language-model tiers on MLX, including the paged Plus MoE."""
    from outlier_runtime.core.env_flags import check_env_flags

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    check_env_flags()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tiers(as_json: bool) -> None:
    """List the tiers and whether this machine can run each."""
    import outlier_runtime

    rows = outlier_runtime.tiers()
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        mark = "yes" if row["runnable"] else "no "
        if row["error"]:
            click.echo(f"{row['name']:<10} INVALID  {row['error']}")
            continue
        downloaded = f"yes ({_size(row['disk_bytes'])})" if row["downloaded"] else "no"
        click.echo(
            f"{row['name']:<10} {row['display_name']:<8} {row['kind']:<10} {row['disk_gb']:>7.2f} GB disk  "
            f"downloaded: {downloaded:<12} runnable: {mark}  ({row['reason']})  {row['model']}"
        )
        if row["memory_plan"]:
            items = ", ".join(f"{line['name']} {line['gb']:.3f}" for line in row["memory_plan"]["lines"])
            click.echo(f"{'':<10} memory plan (GB): {items}")


def _writable_dir(path: Path, flag: str = "--out") -> None:
    """Create an output folder now, so a bad one is refused before minutes of work, in one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".outlier-write-check"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise click.BadParameter(f"cannot write to {path}: {exc.strerror or exc}; choose another folder",
                                 param_hint=flag) from None


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _pull_target(target: str) -> Any:
    from outlier_runtime.core.catalog import discover, resolve_tier
    from outlier_runtime.core.hub_cache import pull_target
    from outlier_runtime.core.plugin_manager import get_registry

    manifest = resolve_tier(target, get_registry()) if target in discover() else None
    return pull_target(target, manifest)


@main.command()
@click.argument("target", metavar="TIER|REPO")
def pull(target: str) -> None:
    """Download a tier's weights (or a repo's) into the Hugging Face cache; run again to resume."""
    from outlier_runtime.core.hub_cache import pull as pull_repo

    wanted = _pull_target(target)
    path = pull_repo(wanted)
    click.echo(f"{wanted.tier or wanted.repo}: {wanted.repo} is downloaded ({path})")


@main.command()
@click.argument("target", metavar="TIER|REPO")
def rm(target: str) -> None:
    """Delete a tier's (or a repo's) downloaded weights from the Hugging Face cache, nothing else."""
    from outlier_runtime.core.hub_cache import hub_cache_dir, remove

    wanted = _pull_target(target)
    freed = remove(wanted)
    if freed is None:
        click.echo(f"{wanted.tier or wanted.repo}: {wanted.repo} is not downloaded; nothing to remove")
        return
    click.echo(f"{wanted.tier or wanted.repo}: removed {wanted.repo} from {hub_cache_dir()}, freed {_size(freed)}")


@main.command()
@click.argument("tier")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--toml", "as_toml", is_flag=True, help="Only the merged manifest, as TOML to paste into a user manifest.")
def info(tier: str, as_json: bool, as_toml: bool) -> None:
    """Show a tier's merged manifest and where it came from."""
    import tomli_w

    from outlier_runtime.core.plugin_manager import get_registry
    from outlier_runtime.core.catalog import discover, resolve_tier, tier_admission

    registry = get_registry()
    manifest = resolve_tier(tier, registry)
    ok, reason, plan, _ = tier_admission(manifest, registry)
    data = {
        "manifest": manifest.to_data(),
        "files": [str(f) for f in discover()[tier].files],
        "runnable": ok,
        "reason": reason,
        "memory_plan": plan.to_dict() if plan else None,
    }
    if as_json:
        _emit_json(data)
        return
    # TOML has no null: an unset knob is left out, which is what a manifest says by omission.
    body = tomli_w.dumps(data["manifest"])
    if as_toml:
        click.echo(body, nl=False)
        return
    click.echo(f"# {manifest.tier.display_name} ({manifest.name}): {manifest.tier.description}")
    click.echo(f"# from: {', '.join(data['files'])}")
    click.echo(f"# runnable here: {'yes' if ok else 'no'} ({reason})")
    if manifest.tier.reference_tok_s is not None:
        click.echo(f"# the product's published decode speed: {manifest.tier.reference_tok_s:g} tok/s (M1 Ultra 64 GB)")
    if plan is not None:
        click.echo("# memory plan:")
        for line in plan.lines:
            click.echo(f"# - {line.name}: {line.bytes / 1e9:.3f} GB ({line.note})")
        for note in [*plan.notes, *plan.warnings]:
            click.echo(f"# {note}")
    click.echo(body, nl=False)


def _paging_options(func: Any) -> Any:
    options = [
        click.option("--model", help="Model directory or Hugging Face repo id (overrides the manifest)."),
        click.option("--k-override", type=int, help="Compute-ready expert slots per MoE layer."),
        click.option("--cache-gb", type=float, help="Bound on all expert bytes held (slots + RAM cache)."),
        click.option("--reader", help="Reader plugin name (e.g. pread, mmap)."),
        click.option("--cache-policy", help="Cache-policy plugin name (e.g. lru, lfu)."),
        click.option("--mmap/--no-mmap", "mmap_experts", default=None, help="Read experts through mmap."),
        click.option("--experts-per-token", type=int, help="Override the router's top-k (changes results)."),
        click.option("--prefetcher", help="Prefetcher plugin name (e.g. next-layer-router)."),
        click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                     help="Any manifest key, dotted, value in TOML syntax (e.g. paging.lazy_load=false)."),
        click.option("--force", is_flag=True, help="Load even if the machine has too little RAM."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _generation_options(func: Any) -> Any:
    """The generation flags `run` and `chat` share; the command receives them as ``**generation``."""
    options = [
        click.option("--max-tokens", type=int, help="Tokens to generate at most (default: the manifest's)."),
        click.option("--temp", "temperature", type=float, help="Sampling temperature (0 = greedy)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold."),
        click.option("--seed", type=int, help="Random seed for sampling."),
        click.option("--top-k", type=int, help="Sample among the k most likely tokens only."),
        click.option("--min-p", type=float,
                     help="Drop tokens below this fraction of the most likely one's probability."),
        click.option("--repetition-penalty", type=float, help="Penalise tokens already in the context (1 = none)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _overrides(settings: tuple[str, ...] = (), **kwargs: Any) -> dict[str, Any]:
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{setting!r} is not KEY=VALUE", param_hint="--set")
        overrides[key.strip()] = _toml_value(value.strip())
    return overrides


def _toml_value(text: str) -> Any:
    """Parse a value as TOML (numbers, booleans, arrays, inline tables); else keep the string."""
    from outlier_runtime.core.manifest import tomllib

    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _print_stats(result: Any, prefix: str = "") -> None:
    """Timing and paging statistics on stderr; ``prefix`` marks a pipeline rank's lines."""
    click.echo(
        f"\n{prefix}-- {result.generation_tokens} tokens, {result.generation_tps:.2f} tok/s decode, "
        f"{result.prompt_tps:.1f} tok/s prompt, peak RSS {result.peak_rss_gb:.2f} GB, mlx peak {result.peak_memory_gb:.3f} GB",
        err=True,
    )
    engine = result.engine
    if not engine:
        return
    total, config = engine["total"], engine.get("config", {})
    click.echo(
        f"{prefix}-- paging: {config.get('slots_per_layer')} slots/layer x {config.get('moe_layers')} layers, "
        f"reader {config.get('reader')}, policy {config.get('cache_policy')}",
        err=True,
    )
    click.echo(
        f"{prefix}-- lookups {total['lookups']}: slot hits {total['slot_hits']}, RAM hits {total['ram_hits']}, "
        f"misses {total['misses']} (hit rate {total['hit_rate']:.1%}); read {total['bytes_read'] / 1e6:.1f} MB "
        f"in {total['read_seconds']:.3f} s; evictions {total['evictions']}; "
        f"resident {total['slot_resident_bytes'] / 1e6:.1f} MB slots + {total['ram_cache_bytes'] / 1e6:.1f} MB RAM",
        err=True,
    )
    shard = config.get("distributed")
    if shard:
        start, end = shard["layers"]
        click.echo(f"{prefix}-- pipeline rank {shard['rank']} of {shard['size']}: layers {start}-{end - 1} of "
                   f"{shard['num_layers']}; MoE layers below are {', '.join(shard['moe_layer_paths'])}", err=True)
    if shard and shard["rank"] == 0 and engine.get("ranks"):
        _print_ranks(engine["ranks"], prefix)
    memory = engine.get("memory") or {}
    if memory and config.get("cache_bytes"):
        click.echo(f"{prefix}-- memory: engine peak {memory['engine_bytes_peak'] / 1e6:.1f} MB (slots + records) of "
                   f"cache_gb {config['cache_bytes'] / 1e6:.1f} MB", err=True)
    click.echo(f"{prefix}-- host syncs {total.get('host_syncs', 0)} over {total.get('calls', 0)} MoE layer calls "
               f"({total.get('host_syncs_per_call', 0.0):.2f} per call)", err=True)
    if total.get("resident_calls"):
        click.echo(f"{prefix}-- {total['resident_calls']} of those calls on layers holding every expert "
                   f"(the original module, no sync, no lookup)", err=True)
    for row in engine["layers"]:
        click.echo(
            f"{prefix}   layer {row['layer']:>3}: hits {row['slot_hits']:>6} ram {row['ram_hits']:>6} "
            f"miss {row['misses']:>6} evict {row['evictions']:>6} read {row['bytes_read'] / 1e6:>8.1f} MB "
            f"{row['read_seconds'] * 1e3:>8.1f} ms  resident {row['resident_experts']}",
            err=True,
        )


def _print_ranks(ranks: list[dict[str, Any]], prefix: str) -> None:
    """Every pipeline rank's totals, gathered to rank 0 after the generation: one row per rank."""
    click.echo(f"{prefix}-- every rank (gathered to rank 0):", err=True)
    click.echo(f"{prefix}   rank  layers     lookups  slot hits  RAM hits   misses   read MB  read s  peak RSS GB"
               f"  layers s  wait s", err=True)
    for row in ranks:
        start, end = row["layers"]
        click.echo(f"{prefix}   {row['rank']:>4}  {start:>3}-{end - 1:<4} {row['lookups']:>9} {row['slot_hits']:>10} "
                   f"{row['ram_hits']:>9} {row['misses']:>8} {row['bytes_read'] / 1e6:>9.1f} "
                   f"{row['read_seconds']:>7.3f} {row['peak_rss_bytes'] / 1e9:>12.2f} {row['layers_seconds']:>9.3f} "
                   f"{row['wait_seconds']:>7.3f}", err=True)


def _run(tier: str, prompt: str, overrides: dict[str, Any], force: bool, generation: dict[str, Any],
         chat: bool | None, stats: bool, as_json: bool, echo: bool | None = None,
         image_paths: tuple[str, ...] = ()) -> None:
    import time

    import outlier_runtime
    from outlier_runtime.core.params import check_generation

    options = {k: v for k, v in generation.items() if v is not None}
    check_generation(prompt, images=list(image_paths) or None, **options)  # before loading: a bad flag costs no load time
    if image_paths:
        from outlier_runtime.core.images import images_for_tier

        options["images"] = images_for_tier(tier, overrides, image_paths)  # decoded and checked before loading
    started = time.perf_counter()
    runtime = outlier_runtime.load(tier, force=force, **overrides)
    rank = _pipeline_rank(runtime)
    if not as_json and not rank:
        click.echo(f"-- loaded {runtime.manifest.tier.display_name} in {time.perf_counter() - started:.1f} s", err=True)
    try:
        if rank:
            # A pipeline rank other than 0 computes the same tokens; rank 0 prints them.
            result = runtime.generate(prompt, chat=chat, **options)
            if stats:
                _print_stats(result, prefix=f"[rank {rank}] ")
            return
        if as_json:
            result = runtime.generate(prompt, chat=chat, **options)
            _emit_json(result.to_dict())
            return
        # A raw completion reads on from the prompt, so it is echoed; a chat reply is not,
        # so that `outlier run TIER PROMPT > reply.txt` holds only the reply.
        use_chat = runtime.manifest.generation.use_chat_template if chat is None else chat
        if (not use_chat) if echo is None else echo:
            click.echo(prompt, nl=False)
        for chunk in runtime.stream(prompt, chat=chat, **options):
            click.echo(chunk.text, nl=False)
        click.echo()
        result = runtime.last_result
        if stats:
            _print_stats(result, prefix="[rank 0] " if rank is not None else "")
        else:
            click.echo(f"-- {result.generation_tokens} tokens, {result.generation_tps:.2f} tok/s", err=True)
    finally:
        runtime.close()


def _pipeline_rank(runtime: Any) -> int | None:
    """This process's rank when the tier runs as a pipeline across processes, else None."""
    distributed = (runtime.engine_stats().get("config") or {}).get("distributed") or {}
    return distributed.get("rank")


def _read_prompt(prompt: str) -> str:
    """PROMPT, or standard input when PROMPT is ``-``."""
    if prompt != "-":
        return prompt
    return sys.stdin.read()


@main.command()
@click.argument("tier")
@click.argument("prompt")
@_paging_options
@_generation_options
@click.option("--chat/--raw", default=None, help="Wrap the prompt in the chat template, or not.")
@click.option("--echo/--no-echo", default=None, help="Print the prompt before the reply (default: in --raw mode only).")
@click.option("--image", "image_paths", multiple=True, metavar="PATH",
              help="An image for a vision tier (repeatable; PNG, JPEG, WebP, GIF, BMP; docs/vision.md).")
@click.option("--stats", is_flag=True, help="Print paging statistics per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming.")
@click.option("--hostfile", type=click.Path(dir_okay=False),
              help="Run as a pipeline across the hosts of this mlx.launch hostfile (docs/distributed.md).")
@click.option("--backend", type=click.Choice(["ring", "mpi", "jaccl"]),
              help="With --hostfile: the mlx.distributed backend (default: the hostfile's, else ring).")
@click.option("--starting-port", type=click.IntRange(1024, 65534),
              help="With --hostfile and the ring backend: the first TCP port (mlx.launch's default 32323).")
@click.pass_context
def run(ctx: click.Context, tier: str, prompt: str, model: str | None, k_override: int | None, cache_gb: float | None,
        reader: str | None, cache_policy: str | None, mmap_experts: bool | None,
        experts_per_token: int | None, prefetcher: str | None, settings: tuple[str, ...], force: bool,
        chat: bool | None, echo: bool | None, image_paths: tuple[str, ...], stats: bool, as_json: bool,
        hostfile: str | None, backend: str | None, starting_port: int | None, **generation: Any) -> None:
    """Generate from TIER, streaming tokens and printing tok/s. PROMPT `-` reads standard input."""
    if hostfile is not None:
        from outlier_runtime import launcher

        sys.exit(launcher.launch(hostfile, backend, starting_port, launcher.rank_argv(ctx, _read_prompt(prompt))))
    overrides = _overrides(settings, model=model, k_override=k_override, cache_gb=cache_gb, reader=reader,
                           cache_policy=cache_policy, mmap_experts=mmap_experts,
                           experts_per_token=experts_per_token, prefetcher=prefetcher)
    _run(tier, _read_prompt(prompt), overrides, force, generation, chat, stats, as_json, echo, image_paths)


@main.command()
@click.argument("tier")
@_paging_options
@_generation_options
@click.option("--system", "system_prompt", help="System prompt (default: the manifest's).")
def chat(tier: str, model: str | None, k_override: int | None, cache_gb: float | None, reader: str | None,
         cache_policy: str | None, mmap_experts: bool | None, experts_per_token: int | None,
         prefetcher: str | None, settings: tuple[str, ...], force: bool, system_prompt: str | None,
         **generation: Any) -> None:
    """Talk with TIER: multi-turn, keeping the KV cache between turns (/exit, /clear, /stats)."""
    import outlier_runtime
    from outlier_runtime.core.chat_session import ChatSession
    from outlier_runtime.core.params import check_generation
    from outlier_runtime.repl import enable_history, run_repl

    options = {k: v for k, v in generation.items() if v is not None}
    check_generation(**options)  # before loading: a bad flag costs no load time
    overrides = _overrides(settings, model=model, k_override=k_override, cache_gb=cache_gb, reader=reader,
                           cache_policy=cache_policy, mmap_experts=mmap_experts,
                           experts_per_token=experts_per_token, prefetcher=prefetcher)
    with outlier_runtime.load(tier, force=force, **overrides) as runtime:
        enable_history()
        run_repl(ChatSession(runtime, system_prompt=system_prompt, **options))


@main.command()
@click.option("--prompt", default="def read_file(path):\n    with open(path) as f:\n", show_default=True,
              help="Python to complete.")
@click.option("--max-tokens", type=int, default=48, show_default=True)
@click.option("--k-override", type=int, default=8, show_default=True, help="Slots per MoE layer (of 64 experts).")
@click.option("--cache-gb", type=float, default=0.006, show_default=True,
              help="Slots + RAM cache bound (the demo's experts total 0.024 GB).")
@click.option("--reader", default=None, help="Reader plugin name.")
@click.option("--cache-policy", default=None, help="Cache-policy plugin name.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result.")
def demo(prompt: str, max_tokens: int, k_override: int, cache_gb: float, reader: str | None,
         cache_policy: str | None, as_json: bool) -> None:
    """Run the Plus tier's paged engine on the embedded demo MoE (no download) and show stats."""
    overrides = _overrides(model="embedded:demo-moe", k_override=k_override, cache_gb=cache_gb,
                           reader=reader, cache_policy=cache_policy)
    _run("plus", prompt, overrides, False, dict(max_tokens=max_tokens, temperature=0.0), False, True, as_json)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="OUTLIER_API_KEY",
              help="Require `Authorization: Bearer KEY` on every request (or set OUTLIER_API_KEY).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the API key from this file's first line (keeps it off command lines: with --hostfile, "
                   "the file must exist on rank 0's host).")
@click.option("--tier", "preload", help="Tier to load at start (--model applies to it); default: on first request.")
@click.option("--tier-override", "tier_overrides", multiple=True, metavar="TIER=PATH|TIER.KEY=VALUE",
              help="Serve TIER from a model directory, or set one of its load overrides "
                   "(e.g. plus.k_override=2, nano.context_window=4096). Repeatable.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Answer requests whose Host header names NAME (loopback names always). Repeatable.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Open connections kept at most; past it, idle ones are closed first.")
@click.option("--prompt-cache-gb", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="KV caches kept between requests by prompt prefix, so a conversation's next turn "
                   "prefills only its new tokens; 0 turns it off.")
@click.option("--memory-gb", type=click.FloatRange(min=0), default=None,
              help="GB the loaded tiers and the prompt cache may take together (default: what is free at start, "
                   "less headroom). Tiers stay loaded while they fit; the least recently used idle one goes first.")
@click.option("--allow-download", is_flag=True,
              help="Let a request for a tier that is not downloaded download it (else: 503, run `outlier pull`).")
@click.option("--max-batch", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Concurrent requests to the loaded tier decoded together at most (a paged MoE reads the "
                   "experts they share once per step); 1 decodes one request at a time.")
@click.option("--allow-local-images", is_flag=True,
              help="Let image_url parts name files on this machine (else data: URLs only; network URLs never).")
@_paging_options
@click.option("--hostfile", type=click.Path(dir_okay=False),
              help="Serve a pipeline across the hosts of this mlx.launch hostfile: rank 0 serves HTTP, "
                   "the others follow it (docs/distributed.md).")
@click.option("--backend", type=click.Choice(["ring", "mpi", "jaccl"]),
              help="With --hostfile: the mlx.distributed backend (default: the hostfile's, else ring).")
@click.option("--starting-port", type=click.IntRange(1024, 65534),
              help="With --hostfile and the ring backend: the first TCP port (mlx.launch's default 32323).")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, api_key: str | None, api_key_file: Path | None,
          preload: str | None,
          tier_overrides: tuple[str, ...], allowed_hosts: tuple[str, ...], max_connections: int,
          prompt_cache_gb: float, memory_gb: float | None, allow_download: bool, max_batch: int,
          allow_local_images: bool,
          model: str | None, k_override: int | None,
          cache_gb: float | None, reader: str | None, cache_policy: str | None, mmap_experts: bool | None,
          experts_per_token: int | None, prefetcher: str | None, settings: tuple[str, ...], force: bool,
          hostfile: str | None, backend: str | None, starting_port: int | None) -> None:
    """Serve the tiers over an OpenAI-compatible HTTP API (models `outlier-<tier>`)."""
    from outlier_runtime.core.peers import launched_rank
    from outlier_runtime.serve.server import ServerConfig, check_bind, parse_tier_overrides, serve as run_server

    overrides = parse_tier_overrides(tier_overrides)
    _check_model_paths(overrides)
    if hostfile is not None:
        from outlier_runtime import launcher

        # The key never goes into the ranks' command lines (readable by every local user, and in the
        # ssh command): rank 0 reads it from the environment (when it runs here) or --api-key-file.
        check_bind(host, api_key or api_key_file)
        sys.exit(launcher.launch(hostfile, backend, starting_port, launcher.rank_argv(ctx), rank_0_stops=True,
                                 api_key=None if api_key_file else api_key))
    if api_key_file is not None:
        if api_key:
            raise ParameterError("--api-key-file: give the key one way, not also --api-key or OUTLIER_API_KEY.")
        api_key = _read_key_file(api_key_file)
    check_bind(host, api_key or None)  # the policy first: a refused host is reported as such
    if launched_rank() in (None, 0):  # a follower rank binds nothing
        _check_port_free(host, port)
    if model is not None:
        if preload is None:
            raise click.UsageError("--model needs --tier: which tier should serve it?")
        overrides.setdefault(preload, {})["model"] = model
    # Paging knobs apply to every paged tier; per-tier overrides win over them.
    paging = _overrides(settings, k_override=k_override, cache_gb=cache_gb, reader=reader,
                        cache_policy=cache_policy, mmap_experts=mmap_experts,
                        experts_per_token=experts_per_token, prefetcher=prefetcher)
    if launched_rank() is not None and "distributed" not in paging:
        # One rank of an mlx.launch'ed job: serve as a pipeline (rank 0 serves, the others follow).
        paging.setdefault("paging.distributed", "pipeline")
    run_server(ServerConfig(host=host, port=port, api_key=api_key or None, force=force,
                            tier_overrides=overrides, paging_overrides=paging, preload=preload,
                            allowed_hosts=list(allowed_hosts), max_connections=max_connections,
                            prompt_cache_gb=prompt_cache_gb, memory_gb=memory_gb, allow_download=allow_download,
                            max_batch=max_batch, allow_local_images=allow_local_images))


def _read_key_file(path: Path) -> str:
    try:
        with path.open(encoding="utf-8") as file:
            key = file.readline(4096).strip()  # a key is one short line; never read a huge file whole
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError(f"--api-key-file {path}: cannot read it ({exc.__class__.__name__}).") from None
    if not key:
        raise ParameterError(f"--api-key-file {path}: its first line is empty; write the key there.")
    if not (key.isascii() and key.isprintable()):
        raise ParameterError(f"--api-key-file {path}: the key must be printable ASCII (it is sent in an HTTP header).")
    return key


def _check_model_paths(overrides: dict[str, dict[str, Any]]) -> None:
    """A `--tier-override TIER=PATH` that is not a model directory fails now, not on the first request."""
    from outlier_runtime.core.resolve import looks_like_repo_id, model_directory
    from outlier_runtime.embedded import SCHEME

    for tier, values in overrides.items():
        reference = values.get("model")
        if isinstance(reference, str) and not reference.startswith(SCHEME) and not looks_like_repo_id(reference):
            model_directory(Path(reference), f"--tier-override {tier}=PATH:")


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on, before loading anything (uvicorn would exit 3)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ParameterError(f"--host {host}: cannot resolve it ({exc.strerror}); give an address or host name.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: SO_REUSEADDR, so a closed connection's TIME_WAIT does not count as in use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ParameterError(
                f"--port {port}: {host}:{port} is not available ({exc.strerror}); pick another port "
                f"or stop what listens there.") from None


@main.command()
@click.option("--options", "with_options", is_flag=True, help="List every option each plugin accepts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(with_options: bool, as_json: bool) -> None:
    """List installed plugins, their distributions and what they register."""
    import outlier_runtime

    rows = outlier_runtime.plugins()
    if as_json:
        _emit_json(rows if with_options else [{k: v for k, v in row.items() if k != "options"} for row in rows])
        return
    for row in rows:
        origin = f"{row['distribution']} {row['version'] or ''}".strip() if row["distribution"] else "(in-process)"
        provides = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(row["provides"].items()))
        click.echo(f"{row['name']:<16} {origin:<28} {provides or '-'}")
        if with_options:
            _print_options(row["options"])


def _print_options(options: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    for kind, by_name in sorted(options.items()):
        for name, fields in sorted(by_name.items()):
            click.echo(f"    {kind.replace('_', ' ')} {name}: " + ("no options" if not fields else ""))
            for field in fields:
                default = "required" if field["required"] else f"default {_toml_literal(field['default'])}"
                click.echo(f"      {field['name']} ({field['type']}, {default}): {field['description']}")


def _toml_literal(value: Any) -> str:
    """A value as it is written in a manifest (true, "lru", { workers = 8 }), not as Python prints it."""
    import tomli_w

    if value is None:
        return "unset"
    if isinstance(value, dict):
        inner = ", ".join(f"{key} = {_toml_literal(item)}" for key, item in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


@main.command()
def schema() -> None:
    """Print the JSON Schema of a tier manifest, plugin options included (for editors validating TOML)."""
    from outlier_runtime.core.catalog import manifest_json_schema
    from outlier_runtime.core.plugin_manager import get_registry

    _emit_json(manifest_json_schema(get_registry()))


@main.command("new-tier")
@click.argument("name")
@click.option("--from", "base", default="plus", show_default=True, help="Tier to start from.")
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Where to write (default: user tier dir).")
def new_tier(name: str, base: str, directory: Path | None) -> None:
    """Write a user manifest for tier NAME, starting from an existing tier."""
    from outlier_runtime.core.new_tier import write_new_tier

    path = write_new_tier(name, base, directory)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("model", default="embedded:demo-moe")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("routing-report"), show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True, help="Held-out tokens to route.")
@click.option("--policies", default=None,
              help="Cache-policy plugins to simulate, comma-separated [default: every registered policy "
                   "that needs no options].")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Draw PNG plots (needs the `plots` extra: matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def routing(model: str, out_dir: Path, max_tokens: int, policies: str | None, plots: bool, as_json: bool) -> None:
    """Route held-out text through MODEL: expert histograms, overlap, cache hit-rate curves (JSON + PNG)."""
    from outlier_runtime.bench.routing import routing_report
    from outlier_runtime.core.resolve import resolve_reference

    _writable_dir(out_dir)
    report = routing_report(resolve_reference(model), out_dir, max_tokens=max_tokens, plots=plots,
                            policies=None if policies is None else [p.strip() for p in policies.split(",") if p.strip()])
    summary = {"out_dir": str(out_dir), "tokens": report["tokens"], "fractions": report["fractions"],
               **report["summary"]}
    if as_json:
        _emit_json(summary)
        return
    click.echo(f"{report['tokens']} held-out tokens, {report['moe_layers']} MoE layers x "
               f"{report['num_experts']} experts, top-{report['top_k']}; wrote {out_dir}/routing.json")
    click.echo(f"mean consecutive-token overlap {summary['mean_consecutive_overlap']:.3f} "
               f"(random routing: {summary['random_routing_overlap']:.3f})")
    click.echo("hit rate by fraction cached: " + ", ".join(f"{f:.0%}" for f in report["fractions"]))
    for policy, rates in summary["hit_rate"].items():
        click.echo(f"  {policy:<8} " + "  ".join(f"{r:6.1%}" for r in rates))


@main.command("make-tiny")
@click.argument("arch")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def make_tiny(arch: str, out: Path, seed: int) -> None:
    """Build a tiny random model of ARCH (an mlx-lm model_type) in mlx-lm's format at OUT."""
    from outlier_runtime.testing.tiny_models import build_tiny_model

    path = build_tiny_model(out, arch, seed=seed)
    click.echo(f"wrote {path}")



def _command_line(ctx: click.Context) -> str:
    """The command as it could be typed again, for provenance files (options that differ from defaults)."""
    parts = ["outlier", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if value in (None, False, ()) or value == param.default:
            continue
        if isinstance(param, click.Argument):
            parts.append(str(value))
            continue
        flag = param.opts[0]
        for item in value if isinstance(value, tuple) else (value,):
            parts += [flag] if item is True else [flag, str(item)]
    return " ".join(parts)


@main.command()
@click.argument("model")
@click.option("--no-checksums", is_flag=True, help="Skip the per-expert CRC32s (faster to write).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary: files, bytes, seconds.")
def pack(model: str, no_checksums: bool, as_json: bool) -> None:
    """Rewrite MODEL's experts as one aligned record each (one read per miss, O_DIRECT-ready).

    MODEL is what --model takes: a model directory, a Hugging Face repo id, or embedded:demo-moe."""
    import time

    from tqdm import tqdm

    from outlier_runtime.core.resolve import resolve_reference
    from outlier_runtime.engine.pack import pack_model

    model_dir = resolve_reference(model)

    bar = tqdm(desc="pack", unit="expert", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    started = time.perf_counter()
    try:
        index = pack_model(model_dir, checksums=not no_checksums, progress=progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    files = sorted(index.parent.iterdir())
    summary = {
        "model": str(model_dir),
        "pack": str(index.parent),
        "files": [str(f) for f in files],
        "file_count": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "seconds": seconds,
    }
    if as_json:
        _emit_json(summary)
        return
    click.echo(f"packed {summary['file_count']} files, {_size(summary['bytes'])}, in {seconds:.1f} s: {summary['pack']}")


@main.command()
@click.option("--quick", is_flag=True, help="A small geometry: the whole bench in well under two minutes.")
@click.option("--layers", type=int, help="MoE layers of the benchmark model (default 2; 4 GB of experts each).")
@click.option("--tokens", type=click.IntRange(min=1), help="Greedy decode tokens per configuration (default 24; --quick 8).")
@click.option("--prompt", help="Prompt (raw, no chat template).")
@click.option("--k-override", type=click.IntRange(min=1), default=20, show_default=True, help="Slots per MoE layer.")
@click.option("--cache-gb", type=float, help="Slots + RAM cache bound (default: the K slots plus 50%).")
@click.option("--config", "configs", multiple=True, help="Run only this configuration (repeatable).")
@click.option("--workers", type=click.IntRange(min=1), help="fanout reader threads.")
@click.option("--chunk-kib", type=click.IntRange(min=1), help="fanout reader piece size in KiB.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the benchmark model is built (default: $OUTLIER_HOME/bench-models).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True, help="Where <timestamp>.json and .md are written.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=900, show_default=True, help="Seconds per configuration.")
@click.option("--repeat", type=click.IntRange(min=1),
              help="Rounds of every configuration, interleaved; each reports its fastest round (default 1). "
                   "With --peers: interleaved rounds, reported as median and spread (default 5).")
@click.option("--peers", is_flag=True,
              help="Compare with the exact peer boyle (extra `peers`) at 25/50/100%% of experts cached, "
                   "on the bench model and small qwen3_5_moe/qwen3_moe/mixtral models, against stock.")
@click.option("--peer-model", "peer_models", multiple=True,
              type=click.Choice(["plus-geometry", "qwen3_5_moe", "qwen3_moe", "mixtral"]),
              help="With --peers: only this model (repeatable; default all four).")
@click.option("--json", "as_json", is_flag=True, help="Print the results JSON instead of the table.")
@click.pass_context
def bench(ctx: click.Context, quick: bool, layers: int | None, tokens: int | None, prompt: str | None,
          k_override: int, cache_gb: float | None, configs: tuple[str, ...], workers: int | None,
          chunk_kib: int | None, cache_dir: Path | None, out_dir: Path, timeout: float, repeat: int | None,
          peers: bool, peer_models: tuple[str, ...], as_json: bool) -> None:
    """Benchmark the Plus engine: stock, mmap, pread, fanout, fanout+pack(+prefetch), disk and compute bounds."""
    from outlier_runtime.bench.runner import PROMPT, BenchOptions, choose_geometry, run_bench

    _writable_dir(out_dir)
    if peers:
        from outlier_runtime.bench.peer_bench import PeerBenchOptions, run_peer_bench

        peer_options = PeerBenchOptions(
            geometry=choose_geometry(quick, layers), tokens=tokens or (32 if quick else 64),
            rounds=repeat or 5, prompt=prompt or PROMPT, models=peer_models or None, cache_dir=cache_dir,
            out_dir=out_dir, timeout_s=timeout, command=_command_line(ctx))
        json_path, md_path, report = run_peer_bench(peer_options, echo=lambda line: click.echo(line, err=True))
        if as_json:
            _emit_json(report)
        else:
            click.echo(md_path.read_text())
        click.echo(f"wrote {json_path} and {md_path}", err=True)
        return

    reader_options = {k: v for k, v in {"workers": workers,
                                        "chunk_bytes": chunk_kib * 1024 if chunk_kib else None}.items() if v}
    options = BenchOptions(
        geometry=choose_geometry(quick, layers), tokens=tokens or (8 if quick else 24), prompt=prompt or PROMPT,
        k_override=k_override, cache_gb=cache_gb, cache_dir=cache_dir, out_dir=out_dir,
        configs=configs or None, reader_options=reader_options, timeout_s=timeout, command=_command_line(ctx),
        repeat=repeat or 1,
    )
    json_path, md_path, report = run_bench(options, echo=lambda line: click.echo(line, err=True))
    if as_json:
        _emit_json(report)
    else:
        click.echo(md_path.read_text())
    click.echo(f"wrote {json_path} and {md_path}", err=True)


@main.command("sweep-k")
@click.option("--k", "ks", type=click.IntRange(min=1), multiple=True, help="Slots per layer to try (default 4, 20, 32, 48).")
@click.option("--quick", is_flag=True, help="The small --quick geometry of `outlier bench`.")
@click.option("--layers", type=int, help="MoE layers of the benchmark model (default 2).")
@click.option("--tokens", type=click.IntRange(min=1), default=16, show_default=True, help="Greedy decode tokens per prompt.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable; default one).")
@click.option("--reader", default="fanout", show_default=True, help="Reader plugin name.")
@click.option("--cache-gb", type=float, help="Slots + RAM cache bound (default: K slots plus 50%, per K).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Where the model is built.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench-results/k-sweep"), show_default=True,
              help="Where K_SWEEP_RESULTS.md and k_sweep_K<n>.json are written.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=900, show_default=True, help="Seconds per K.")
@click.pass_context
def sweep_k(ctx: click.Context, ks: tuple[int, ...], quick: bool, layers: int | None, tokens: int,
            prompts: tuple[str, ...], reader: str, cache_gb: float | None, cache_dir: Path | None,
            out_dir: Path, timeout: float) -> None:
    """The product's K sweep: tok/s, peak RSS and agreement with stock greedy tokens, one process per K."""
    from outlier_runtime.bench.runner import PROMPT, choose_geometry, run_sweep_k

    _writable_dir(out_dir)

    md = run_sweep_k(choose_geometry(quick, layers), ks or (4, 20, 32, 48), out_dir, tokens=tokens,
                     prompts=prompts or (PROMPT,), reader=reader, cache_gb=cache_gb, cache_dir=cache_dir,
                     timeout_s=timeout, command=_command_line(ctx), echo=lambda line: click.echo(line, err=True))
    click.echo(md.read_text())
    click.echo(f"wrote {md} and k_sweep_K<n>.json next to it", err=True)


# -- outlier verify (issue #12): a thin wrapper over outlier_runtime.verify() ------------------
@main.command()
@click.option("--model", default=None, help="An mlx-lm MoE directory small enough to load whole "
              "(default: the embedded demo MoE).")
@click.option("--slots", "slot_counts", type=int, multiple=True,
              help="Slot counts to page with (repeatable; default 1, top-k, half, all).")
@click.option("--longest-prompt", type=int, default=1100, show_default=True,
              help="Longest prompt (tokens) among those chosen at the kernel thresholds.")
@click.option("--new-tokens", type=int, default=8, show_default=True, help="Greedy tokens compared.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(model: str | None, slot_counts: tuple[int, ...], longest_prompt: int, new_tokens: int,
           as_json: bool) -> None:
    """Check that the paged engine is bit-identical to stock mlx-lm on this machine (exit 0 if so)."""
    from outlier_runtime.verification import verify as run_verify

    report = run_verify(model, list(slot_counts) or None, longest_prompt, new_tokens)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.table())
        click.echo(report.verdict())
    sys.exit(0 if report.identical else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
