"""Helpers shared by several test modules (imported as ``helpers``: tests/ is on sys.path)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import mlx.core as mx
import numpy as np
import pytest

from outlier_paged_moe.store import EMPTY, ExpertStore
from outlier_paged_moe.switch import PagedSwitch


def paged_store(runtime) -> ExpertStore:
    """The expert store behind a paged runtime's switch layers."""
    for _, module in runtime.model.named_modules():
        if isinstance(module, PagedSwitch):
            return module._store
    raise LookupError(f"tier {runtime.name!r} has no paged switch layers")


def assert_slots_hold_true_experts(runtime) -> None:
    """Every slot marked valid holds exactly its expert's bytes from the checkpoint."""
    store = paged_store(runtime)
    for slots in store.layers:
        assert set(slots.slot_of.values()) == {s for s, e in enumerate(slots.expert_in_slot) if e != EMPTY}
        for expert, slot in slots.slot_of.items():
            assert slots.expert_in_slot[slot] == expert
            for buffer, tensor in zip(slots.buffers, slots.layer.tensors):
                file, offset, length = tensor.range_of(expert)
                with open(file, "rb") as handle:
                    handle.seek(offset)
                    expected = np.frombuffer(handle.read(length), dtype=np.uint8)
                got = np.asarray(buffer[slot].view(mx.uint8)).reshape(-1)
                assert np.array_equal(got, expected), (slots.layer.path, expert, tensor.param)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (mlx.launch gives rank r port p + r)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


@contextlib.contextmanager
def running_server(tiny, home: Path, api_key: str, context_window: int,
                   extra_args: Sequence[str] = ()) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """A real `outlier serve` subprocess on a free loopback port: nano is a tiny dense llama with
    ``context_window`` tokens, plus a tiny qwen3 MoE paged with 2 slots per layer and no RAM cache.
    ``extra_args`` are added to its command line. Yields (process, base_url, log path)."""
    port = free_port()
    command = [
        sys.executable, "-m", "outlier_runtime.cli", "serve", "--port", str(port), "--api-key", api_key,
        "--force", "--tier-override", f"nano={tiny('llama')}",
        "--tier-override", f"nano.context_window={context_window}",
        "--tier-override", f"plus={tiny('qwen3_moe')}", "--k-override", "2", "--cache-gb", "0", *extra_args,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("OUTLIER_API_KEY", "OUTLIER_TIERS_PATH")}
    env.update(OUTLIER_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(home / "hf-cache"))
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_ready(process, base_url, log_path, api_key)
        yield process, base_url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_ready(process: subprocess.Popen, base_url: str, log_path: Path, api_key: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"outlier serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            headers = {"Authorization": f"Bearer {api_key}"}
            if httpx.get(f"{base_url}/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"outlier serve did not answer within 60 s:\n{log_path.read_text()}")


def paged_switches(runtime) -> list[PagedSwitch]:
    """The paged switch layers of a paged runtime."""
    return [m for _, m in runtime.model.named_modules() if isinstance(m, PagedSwitch)]
