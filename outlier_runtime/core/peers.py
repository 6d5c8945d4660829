"""The ranks of an ``mlx.launch``'ed job: which rank this process is, the ranks' addresses, and a
lost peer as one line. Shared by the paged tier's pipeline and the server's work channel."""

from __future__ import annotations

import json
import os
import re

from outlier_runtime.core.errors import DistributedError

#: Phrases of mlx's distributed backends when a peer is gone (the ring backend: "[ring] ...").
_PEER_LOST = re.compile(r"\[(ring|mpi|jaccl|nccl)\]|connection to a peer|closed by the peer", re.IGNORECASE)

#: Where each launcher puts this process's rank: mlx.launch (ring, jaccl), then MPI's.
_RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched_rank() -> int | None:
    """This process's rank when a launcher started it as one rank of a job, else None (read from
    the environment: nothing is connected)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launch_hosts() -> list[str]:
    """The ranks' addresses from the hostfile mlx.launch wrote for the ring backend, if any."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        with open(path or "", encoding="utf-8") as handle:
            ranks = json.load(handle)
        return [", ".join(addresses) if isinstance(addresses, list) else str(addresses) for addresses in ranks]
    except (OSError, ValueError, TypeError):
        return []


def is_peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is mlx's distributed backend reporting a peer gone."""
    return isinstance(exc, RuntimeError) and bool(_PEER_LOST.search(str(exc)))


def lost_peer_error(rank: int, size: int, hosts: list[str], peers: list[int], exc: BaseException,
                    role: str = "pipeline peer") -> DistributedError:
    """One line naming this rank, the peer(s) it lost and their addresses, and what to do."""
    def host(r: int) -> str:
        return hosts[r] if r < len(hosts) else "?"

    named = " or ".join(f"rank {r} ({host(r)})" for r in peers)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DistributedError(
        f"rank {rank} of {size} ({host(rank)}): lost {role} {named}: {first}; "
        f"that rank exited or cannot be reached: see its output, then start every rank again")
