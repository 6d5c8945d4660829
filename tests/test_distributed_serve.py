"""`outlier serve` as a two-rank pipeline over loopback (ring backend): rank 0 serves HTTP and the
follower runs every request with it. The official openai client gets stock mlx-lm's greedy reply,
request after request (also after a client that left mid-stream); rank 0's shutdown ends the
follower cleanly; a follower killed while idle or mid-request ends the server with exit 2 and one
line; a tier one rank cannot admit is loaded by none. Every process
runs under a timeout; only 127.0.0.1 is used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx_lm
import openai
import pytest

import outlier_runtime

from distributed_rank import MAX_TOKENS, PROMPT  # tests/ is on sys.path
from helpers import free_port, free_port_pair, wait_until_ready

API_KEY = "test-key"
#: Seconds a rank may take to end after its peer was killed, or after rank 0 was told to stop.
END_TIMEOUT = 45


def _serve_args(model: Path, port: int) -> list[str]:
    return ["serve", "--port", str(port), "--api-key", API_KEY, "--tier", "plus",
            "--tier-override", f"plus={model}", "--k-override", "2", "--cache-gb", "0"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUTLIER_API_KEY", "OUTLIER_TIERS_PATH")}
    return {**env, "OUTLIER_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def _stock_reply(model: Path) -> str:
    stock, tokenizer = mlx_lm.load(str(model))
    return mlx_lm.generate(stock, tokenizer, PROMPT, max_tokens=MAX_TOKENS)


def _complete(client: openai.OpenAI) -> str:
    reply = client.completions.create(model="outlier-plus", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == MAX_TOKENS
    return reply.choices[0].text


def _end(process: subprocess.Popen, sig: int) -> tuple[int, str]:
    """Send ``sig`` to the process's group; its exit status and output (bounded: killed and failed
    if it does not end within END_TIMEOUT)."""
    os.killpg(process.pid, sig)
    return _wait(process)


def _wait(process: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=END_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"still running {END_TIMEOUT} s after it should have ended:\n{(out or '')[-3000:]}")
    return process.returncode, out


def test_outlier_serve_with_a_hostfile_answers_like_stock_mlx_lm(tiny, tmp_path):
    model = tiny("qwen3_moe")
    expected = _stock_reply(model)
    with outlier_runtime.load("plus", model=str(model), k_override=2, cache_gb=0, force=True) as runtime:
        assert runtime.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, chat=False).text == expected
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    port = free_port()
    command = [str(Path(sys.executable).with_name("outlier")), *_serve_args(model, port), "--force",
               "--hostfile", str(hostfile), "--starting-port", str(free_port_pair())]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=_env(tmp_path / "home"), stdout=log, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True, cwd=tmp_path)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(process, base_url, log_path, API_KEY)
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
        assert _complete(client) == expected
        assert _complete(client) == expected  # a second request in a row

        # A client that leaves mid-stream: every rank stops at the same chunk, and the next request
        # still runs in step (a rank left behind would give other tokens, or hang).
        stream = client.chat.completions.create(model="outlier-plus", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=200, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        assert _complete(client) == expected

        # The last request's statistics hold every rank's own, gathered to rank 0.
        stats = httpx.get(f"{base_url}/outlier/stats", headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=10).json()
        ranks = stats["last_request"]["result"]["engine"]["ranks"]
        assert [row["rank"] for row in ranks] == [0, 1] and all(row["bytes_read"] > 0 for row in ranks)
        assert stats["requests"]["completed"] == 3
    finally:
        status, _ = _end(process, signal.SIGINT)  # Ctrl-C in a terminal reaches every local process
    out = log_path.read_text()
    assert status == 0, out[-3000:]
    assert not [line for line in out.splitlines() if line.startswith("error:")], out[-3000:]


def _serve_by_hand(model: Path, tmp_path: Path, rank_args: tuple[list[str], list[str]] = ([], []),
                   loaded: bool = True) -> tuple[list[subprocess.Popen], str, int]:
    """Both ranks of `outlier serve` started by hand with the environment mlx.launch sets
    (MLX_HOSTFILE, MLX_RANK), so what each does is its own, not the launcher's; ``rank_args`` are
    added to each rank's command. Waits until rank 0 answers (with the tier loaded, if ``loaded``);
    returns the processes, the base URL and the ring's first port."""
    ring = free_port_pair()
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{ring}"], [f"127.0.0.1:{ring + 1}"]]))
    port = free_port()
    # No distributed setting: `outlier serve` in a launched rank serves as a pipeline by itself.
    command = [sys.executable, "-m", "outlier_runtime.cli", *_serve_args(model, port)]
    processes = []
    for rank in range(2):
        env = _env(tmp_path / "home", MLX_HOSTFILE=str(hostfile), MLX_RANK=str(rank))
        processes.append(subprocess.Popen([*command, *rank_args[rank]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            break
        try:
            health = httpx.get(f"{base_url[:-3]}/health", headers={"Authorization": f"Bearer {API_KEY}"},
                               timeout=2).json()
            if health["loaded_model"] == "outlier-plus" or not loaded:
                return processes, base_url, ring
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("the two ranks did not serve within 60 s:\n" + "\n".join(p.communicate()[0][-2000:] for p in processes))


def test_rank_0_shutting_down_ends_the_follower_cleanly(tiny, tmp_path):
    model = tiny("qwen3_moe")
    processes, base_url, _ = _serve_by_hand(model, tmp_path, (["--force"], ["--force"]))
    try:
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
        assert _complete(client) == _stock_reply(model)
        status, out = _end(processes[0], signal.SIGTERM)
        assert status == 0, out[-3000:]
        status, out = _wait(processes[1])  # told by rank 0, not signalled
        assert status == 0, out[-3000:]
        assert "error" not in out.lower(), out[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def test_a_killed_follower_ends_the_server_with_one_line(tiny, tmp_path):
    processes, _, ring = _serve_by_hand(tiny("qwen3_moe"), tmp_path, (["--force"], ["--force"]))
    try:
        killed = time.monotonic()
        os.killpg(processes[1].pid, signal.SIGKILL)
        status, out = _wait(processes[0])  # while idle: the heartbeat finds the follower gone
        took = time.monotonic() - killed
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert status == 2, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    assert "rank 0 of 2" in lines[0] and f"lost follower rank 1 (127.0.0.1:{ring + 1})" in lines[0]
    assert took < END_TIMEOUT


def test_a_tier_one_rank_cannot_load_is_refused_on_every_rank(tiny, tmp_path):
    """Rank 1's memory plan refuses the tier (cache_gb 0 holds no slot, and it has no --force): no
    rank loads it, the request gets a 400 naming the rank, and the server goes on serving."""
    processes, base_url, _ = _serve_by_hand(tiny("qwen3_moe"), tmp_path, (["--force"], []), loaded=False)
    try:
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
        for _ in range(2):  # refused again, not stuck: every rank still answers rank 0's actions
            with pytest.raises(openai.BadRequestError, match=r"rank\(s\) 1 of this pipeline cannot load it"):
                _complete(client)
        health = httpx.get(f"{base_url[:-3]}/health", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert health.json()["loaded_model"] is None
        status, out = _end(processes[0], signal.SIGTERM)
        assert status == 0, out[-3000:]
        status, out = _wait(processes[1])
        assert status == 0, out[-3000:]
        assert "rank 1 cannot load tier plus" in out, out[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def test_a_follower_killed_mid_request_ends_the_server_with_one_line(tiny, tmp_path):
    processes, base_url, ring = _serve_by_hand(tiny("qwen3_moe"), tmp_path, (["--force"], ["--force"]))
    try:
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
        stream = client.completions.create(model="outlier-plus", prompt=PROMPT, max_tokens=2000, temperature=0,
                                           stream=True)
        next(iter(stream))  # the generation runs on both ranks now
        os.killpg(processes[1].pid, signal.SIGKILL)
        with pytest.raises((openai.APIError, httpx.HTTPError)):  # the stream ends without finishing
            for chunk in stream:
                assert chunk.choices[0].finish_reason is None
        status, out = _wait(processes[0])
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert status == 2, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    assert "rank 0 of 2" in lines[0] and f"rank 1 (127.0.0.1:{ring + 1})" in lines[0]
