"""Two ranks over loopback (ring backend): pipeline-parallel paging gives stock mlx-lm's greedy
tokens, each rank reads only its own layers' experts, and a killed rank ends the other's run
with one line naming the ranks. Every process runs under a timeout; only 127.0.0.1 is used."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest

import outlier_runtime

from distributed_rank import MAX_TOKENS, PROMPT  # tests/ is on sys.path
from helpers import free_port_pair

RANK_SCRIPT = Path(__file__).with_name("distributed_rank.py")

LAUNCHER = Path(sys.executable).with_name("mlx.launch")
#: Seconds a whole two-rank run may take (each rank loads a tiny model and makes 12 tokens).
RUN_TIMEOUT = 90
#: Seconds the surviving rank may take to end after its peer was killed.
FAULT_TIMEOUT = 45


def _run_bounded(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; on timeout kill the whole group and fail."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, **kwargs)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{command[:3]} ... still running after {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out)


def _launch(model: Path, out_dir: Path, *extra: str) -> list[dict]:
    """Both ranks through mlx.launch (ring, loopback); their result files, rank 0 first."""
    if not LAUNCHER.exists():
        pytest.skip(f"{LAUNCHER} not found (mlx's launcher is installed with mlx)")
    command = [str(LAUNCHER), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1",
               "--starting-port", str(free_port_pair()), "--python", sys.executable,
               str(RANK_SCRIPT), str(model), str(out_dir), *extra]
    done = _run_bounded(command, RUN_TIMEOUT, cwd=out_dir)
    # mlx.launch exits 0 even when a rank failed: the result files say whether both finished.
    files = [out_dir / f"rank{rank}.json" for rank in range(2)]
    assert all(f.exists() for f in files), done.stdout[-3000:]
    return [json.loads(f.read_text()) for f in files]


def _single_process(model: Path) -> tuple[list[int], list[int]]:
    """Greedy tokens of stock mlx-lm and of the one-process paged tier, for the same prompt."""
    stock, tokenizer = mlx_lm.load(str(model))
    prompt = tokenizer.encode(PROMPT)
    stock_tokens = [r.token for r in mlx_lm.stream_generate(stock, tokenizer, prompt, max_tokens=MAX_TOKENS)]
    with outlier_runtime.load("plus", model=str(model), k_override=2, cache_gb=0, force=True) as runtime:
        paged = runtime.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, chat=False).tokens
    return stock_tokens, paged


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_two_ranks_match_stock_and_read_only_their_layers(arch, tiny, tmp_path):
    model = tiny(arch)
    ranks = _launch(model, tmp_path)
    stock, paged = _single_process(model)
    assert paged == stock
    for result in ranks:
        assert result["tokens"] == stock  # every rank samples the same tokens; rank 0 owns output

    seen = []
    for rank, result in enumerate(ranks):
        engine = result["engine"]
        shard = engine["config"]["distributed"]
        assert (shard["rank"], shard["size"]) == (rank, 2)
        start, end = shard["layers"]
        paths = shard["moe_layer_paths"]
        # This rank's switch layers are exactly its share, and it read experts in each of them.
        assert [int(p.split(".layers.")[1].split(".")[0]) for p in paths] == list(range(start, end))
        assert len(engine["layers"]) == len(paths) == engine["config"]["moe_layers"]
        assert all(layer["misses"] > 0 and layer["bytes_read"] > 0 for layer in engine["layers"])
        assert engine["total"]["bytes_read"] == sum(layer["bytes_read"] for layer in engine["layers"])
        seen += paths
    # Rank 0 runs the last layers; together the ranks cover every layer once.
    num_layers = ranks[0]["engine"]["config"]["distributed"]["num_layers"]
    first, last = (ranks[r]["engine"]["config"]["distributed"]["layers"] for r in (1, 0))
    assert first[0] == 0 and first[1] == last[0] and last[1] == num_layers
    assert len(seen) == len(set(seen)) == num_layers


def test_every_ranks_stats_are_gathered_to_rank_0(tiny, tmp_path):
    """After a generation rank 0's result holds every rank's own totals; their layers partition the model."""
    ranks = _launch(tiny("qwen3_moe"), tmp_path)
    gathered = ranks[0]["engine"]["ranks"]
    assert [row["rank"] for row in gathered] == [0, 1]
    for rank, row in enumerate(gathered):
        own = ranks[rank]["engine"]
        for name in ("lookups", "slot_hits", "ram_hits", "misses", "bytes_read", "evictions"):
            assert row[name] == own["total"][name], (rank, name)
        assert row["read_seconds"] == pytest.approx(own["total"]["read_seconds"], abs=1e-6)
        assert row["layers"] == own["config"]["distributed"]["layers"]
        assert row["moe_layers"] == len(own["layers"])
        assert row["bytes_read"] > 0 and row["peak_rss_bytes"] > 0
        # Each rank timed its own layers and its waits for the other rank apart.
        assert row["layers_seconds"] > 0 and row["wait_seconds"] > 0
    assert ranks[1]["engine"]["ranks"] == gathered  # an all_gather: every rank holds the same list
    num_layers = ranks[0]["engine"]["config"]["distributed"]["num_layers"]
    covered = sorted(layer for row in gathered for layer in range(*row["layers"]))
    assert covered == list(range(num_layers))


def _by_hand(models: list[Path], port: int, out_dir: Path, *extra: str) -> tuple[list[subprocess.Popen], list[str]]:
    """Both ranks started by hand with the environment mlx.launch sets (MLX_HOSTFILE, MLX_RANK),
    rank r on ``models[r]``; waits (bounded) for both. Returns the processes and their stderr."""
    hostfile = out_dir / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    processes = []
    for rank, model in enumerate(models):
        env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)}
        command = [sys.executable, str(RANK_SCRIPT), str(model), str(out_dir), *extra]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
    errors = []
    try:
        for process in processes:
            errors.append(process.communicate(timeout=FAULT_TIMEOUT)[1])
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    return processes, errors


def test_ranks_with_different_model_files_are_refused(tiny, tmp_path):
    processes, errors = _by_hand([tiny("qwen3_moe"), tiny("qwen3_moe", num_experts=8)], free_port_pair(), tmp_path)
    for rank, (process, err) in enumerate(zip(processes, errors)):
        assert process.returncode == 2, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("outlier:")]
        assert len(lines) == 1 and f"rank {rank} of 2" in lines[0], err[-3000:]
        assert "rank(s) 1 have other model files than rank 0" in lines[0]


def test_sampling_without_a_seed_gives_every_rank_the_same_tokens(tiny, tmp_path):
    """The ranks share rank 0's random seed at load, so they draw the same tokens from the same logits."""
    ranks = _launch(tiny("qwen3_moe"), tmp_path, "--temp", "1.0")
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    assert ranks[0]["tokens"]


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_other_with_one_line(victim, tiny, tmp_path):
    """Started by hand with the environment mlx.launch sets (MLX_HOSTFILE, MLX_RANK), so what the
    survivor does is its own, not the launcher's (which would terminate it)."""
    model = tiny("qwen3_moe")
    port = free_port_pair()
    processes, errors = _by_hand([model, model], port, tmp_path, "--kill", str(victim), "3")
    survivor = 1 - victim
    err = errors[survivor]
    assert processes[victim].returncode == -signal.SIGKILL
    assert processes[survivor].returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("outlier:")]
    assert len(lines) == 1, err[-3000:]
    assert f"rank {survivor} of 2" in lines[0] and f"lost pipeline peer rank {victim}" in lines[0]
    assert f"127.0.0.1:{port + victim}" in lines[0]
    assert not (tmp_path / f"rank{survivor}.json").exists()


def test_outlier_run_with_a_hostfile_runs_two_ranks(tiny, tmp_path):
    """`outlier run --hostfile` wraps mlx.launch: rank 0 prints the reply once, each rank its stats."""
    model = tiny("qwen3_moe")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    with outlier_runtime.load("plus", model=str(model), k_override=2, cache_gb=0, force=True) as runtime:
        expected = runtime.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, chat=False).text
    outlier = Path(sys.executable).with_name("outlier")
    command = [str(outlier), "run", "plus", PROMPT, "--raw", "--model", str(model), "--k-override", "2",
               "--cache-gb", "0", "--force", "--temp", "0", "--max-tokens", str(MAX_TOKENS), "--stats",
               "--hostfile", str(hostfile), "--starting-port", str(free_port_pair())]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=tmp_path)
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"outlier run --hostfile still running after {RUN_TIMEOUT} s:\n{err[-3000:]}")
    assert process.returncode == 0, err[-3000:]
    assert out == PROMPT + expected + "\n"
    for rank, layer in ((0, "model.layers.1."), (1, "model.layers.0.")):
        line = next(l for l in err.splitlines() if l.startswith(f"[rank {rank}] -- pipeline rank {rank} of 2"))
        assert layer in line
    # Rank 0 prints one table of every rank's totals, gathered after the generation.
    lines = err.splitlines()
    header = lines.index("[rank 0] -- every rank (gathered to rank 0):")
    rows = [line.split() for line in lines[header + 2:header + 4]]
    assert [(row[2], row[3]) for row in rows] == [("0", "1-1"), ("1", "0-0")], err[-3000:]


def test_outlier_run_with_a_hostfile_exits_2_when_a_rank_fails(tmp_path):
    from click.testing import CliRunner

    from outlier_runtime.cli import main

    missing = CliRunner().invoke(main, ["run", "plus", "hi", "--hostfile", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "no such file" in missing.output
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    command = [str(Path(sys.executable).with_name("outlier")), "run", "plus", "hi", "--model", str(tmp_path / "no-model"),
               "--hostfile", str(hostfile), "--starting-port", str(free_port_pair())]
    done = _run_bounded(command, RUN_TIMEOUT, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-3000:]
    assert re.search(r"^error: rank [0-9, ]+ failed", done.stdout, re.MULTILINE), done.stdout[-3000:]


def test_pipeline_in_one_process_is_one_rank(tiny):
    """Without mlx.launch the group has one rank: every layer here, the same tokens."""
    model = tiny("qwen3_moe")
    stock, paged = _single_process(model)
    with outlier_runtime.load("plus", model=str(model), distributed="pipeline", k_override=2, cache_gb=0,
                              force=True) as runtime:
        result = runtime.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, chat=False)
        shard = runtime.engine_stats()["config"]["distributed"]
    assert result.tokens == paged == stock
    assert (shard["rank"], shard["size"], shard["layers"]) == (0, 1, [0, 2])


def test_a_split_that_does_not_fit_is_refused(tiny):
    with pytest.raises(outlier_runtime.ParameterError, match=r"pipeline_split = \[1, 1\]: needs 1 entries"):
        outlier_runtime.load("plus", model=str(tiny("qwen3_moe")), distributed="pipeline", pipeline_split=[1, 1],
                             cache_gb=0, force=True)


def test_a_model_without_a_pipeline_split_is_refused(tiny):
    with pytest.raises(outlier_runtime.CheckpointError, match="has no pipeline\\(group\\) split"):
        outlier_runtime.load("plus", model=str(tiny("mixtral")), distributed="pipeline", cache_gb=0, force=True)
