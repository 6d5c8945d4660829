"""Pipeline-parallel paging across the ranks of an ``mlx.launch``'ed job (``distributed = "pipeline"``).

mlx-lm's models with ``pipeline(group)`` split their layers across ranks: rank ``r`` runs a
contiguous run of layers (rank 0 the last ones, so it holds the output), receives the hidden
state from rank ``r + 1`` and sends its own to rank ``r - 1``; an ``all_gather`` at the end
gives every rank the same output, so every rank runs ``stream_generate`` and samples the same
tokens. Split before the expert index is built, the switch modules of other ranks' layers are
no longer in the model: each rank builds slots, a RAM cache and a reader for its own layers only,
and never reads another rank's experts.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from outlier_runtime.core.errors import CheckpointError, DistributedError, ParameterError
from outlier_runtime.core.peers import is_peer_lost, launch_hosts, lost_peer_error
from outlier_runtime.core.system import peak_rss_bytes
from outlier_runtime.engine.checkpoint import TensorEntry

from .options import PagedMoEOptions
from .stage_timer import StageTimer

log = logging.getLogger(__name__)

#: Each rank's figures gathered to every rank after a generation, in this order (one int64 each).
RANK_FIELDS = ("rank", "layer_start", "layer_end", "moe_layers", "lookups", "slot_hits", "ram_hits", "misses",
               "bytes_read", "read_microseconds", "evictions", "peak_rss_bytes", "wait_microseconds",
               "layers_microseconds")


@dataclass
class PipelineShard:
    """This rank's part of a pipeline: layers ``[start, end)`` of the text model."""

    group: Any  # mx.distributed.Group
    rank: int
    size: int
    start: int
    end: int
    num_layers: int
    hosts: list[str]
    #: Set once a peer is known to be gone: no more collective calls (they would wait forever).
    peer_lost: bool = False
    #: Time waiting for the pipeline, apart from this rank's own layers (see stage_timer.py).
    timer: StageTimer = field(default_factory=StageTimer)

    def info(self) -> dict[str, Any]:
        return {"strategy": "pipeline", "rank": self.rank, "size": self.size,
                "layers": [self.start, self.end], "num_layers": self.num_layers}

    def host_of(self, rank: int) -> str:
        return self.hosts[rank] if rank < len(self.hosts) else "?"

    def peers(self) -> list[int]:
        """The ranks this one exchanges hidden states with: the previous and next stage."""
        return sorted({r for r in (self.rank + 1, self.rank - 1) if 0 <= r < self.size})

    def synchronize(self) -> None:
        """Wait until every rank got here (as mlx-lm's sharded_load does after loading)."""
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu, group=self.group))

    def check_same_model(self, fingerprint: bytes, path: Any) -> None:
        """Refuse to start unless every rank has the same model files (compared through all_gather)."""
        mine = mx.array(list(fingerprint), dtype=mx.uint8)
        try:
            every = mx.distributed.all_gather(mine, group=self.group, stream=mx.cpu)
            mx.eval(every)
        except RuntimeError as exc:
            raise (self.explain_error(exc) or exc) from None
        rows = every.reshape(self.size, -1).tolist()
        differ = [rank for rank, row in enumerate(rows) if row != rows[0]]
        if differ:
            raise DistributedError(
                f"rank {self.rank} of {self.size} ({self.host_of(self.rank)}): rank(s) "
                f"{', '.join(map(str, differ))} have other model files than rank 0 (config.json or safetensors "
                f"headers differ; this rank's are {path}): give every machine the same checkpoint")

    def share_random_seed(self) -> None:
        """Seed mlx's generator with rank 0's random seed on every rank: each rank samples from the
        same logits, so with one seed they draw the same tokens even when the caller gives none."""
        mine = mx.array([int.from_bytes(os.urandom(4), "little") >> 1], dtype=mx.int32)
        try:
            every = mx.distributed.all_gather(mine, group=self.group, stream=mx.cpu)
            mx.eval(every)
        except RuntimeError as exc:
            raise (self.explain_error(exc) or exc) from None
        mx.random.seed(int(every[0].item()))

    def gather_stats(self, engine: dict[str, Any]) -> dict[str, Any]:
        """``engine`` (this rank's statistics) with ``ranks``: every rank's totals, rank 0 first,
        gathered with one all_gather of a fixed-size vector. Every rank calls it at the end of a
        generation; the pipeline's last step is finished first, so the gather does not interleave
        with its sends and receives."""
        from mlx_lm.generate import generation_stream

        if self.peer_lost:
            return engine
        total = engine["total"]
        mine = {"rank": self.rank, "layer_start": self.start, "layer_end": self.end,
                "moe_layers": len(engine["layers"]), "read_microseconds": round(total["read_seconds"] * 1e6),
                "peak_rss_bytes": peak_rss_bytes(),
                "wait_microseconds": round(self.timer.wait_seconds * 1e6),
                "layers_microseconds": round(self.timer.layers_seconds * 1e6),
                **{name: total[name] for name in ("lookups", "slot_hits", "ram_hits", "misses", "bytes_read",
                                                  "evictions")}}
        try:
            mx.synchronize(generation_stream)
            every = mx.distributed.all_gather(mx.array([mine[f] for f in RANK_FIELDS], dtype=mx.int64),
                                              group=self.group, stream=mx.cpu)
            mx.eval(every)
        except RuntimeError as exc:
            raise (self.explain_error(exc) or exc) from None
        ranks = [dict(zip(RANK_FIELDS, row)) for row in every.reshape(self.size, len(RANK_FIELDS)).tolist()]
        for row in ranks:
            row["layers"] = [row.pop("layer_start"), row.pop("layer_end")]
            row["read_seconds"] = row.pop("read_microseconds") / 1e6
            row["wait_seconds"] = row.pop("wait_microseconds") / 1e6
            row["layers_seconds"] = row.pop("layers_microseconds") / 1e6
            row["host"] = self.host_of(row["rank"])
        return {**engine, "ranks": ranks}

    def finish(self) -> None:
        """Let the step mlx-lm computes ahead finish on every rank, then wait for all ranks: a rank
        that exits with its peer's bytes unread resets the connection, and the peer loses the end
        of its last step. Called when the runtime closes; a peer already gone is only logged."""
        from mlx_lm.generate import generation_stream

        if self.peer_lost:
            return
        try:
            mx.synchronize(generation_stream)
            mx.synchronize()
            self.synchronize()
        except RuntimeError as exc:
            log.warning("%s", self.explain_error(exc) or exc)

    def explain_error(self, exc: BaseException) -> DistributedError | None:
        """A lost peer as one line naming this rank and the peer(s); other errors unchanged."""
        if not is_peer_lost(exc):
            return None
        self.peer_lost = True
        return lost_peer_error(self.rank, self.size, self.hosts, self.peers(), exc)


def model_fingerprint(path: Any, entries: dict[str, TensorEntry]) -> bytes:
    """SHA-256 of config.json and every tensor's name, dtype, shape, size and shard name: equal on
    two machines holding the same checkpoint, wherever it lies (no paths, mtimes or inodes)."""
    digest = hashlib.sha256(Path(path, "config.json").read_bytes())
    for name in sorted(entries):
        entry = entries[name]
        digest.update(repr((name, entry.dtype, tuple(entry.shape), entry.nbytes, Path(entry.path).name)).encode())
    return digest.digest()


def pipeline_model(model: Any) -> Any:
    """The inner text model that has mlx-lm's ``pipeline(group)`` (``model.model``), or None."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and callable(getattr(inner, "pipeline", None)) else None


def _join(options: PagedMoEOptions) -> Any:
    """The mlx.distributed group of this job (one rank when not launched); mlx keeps it once joined."""
    try:
        return mx.distributed.init(backend=options.distributed_backend)
    except RuntimeError as exc:
        raise DistributedError(f"paging.distributed = \"pipeline\": mlx.distributed cannot start the "
                               f"{options.distributed_backend!r} backend ({exc}); launch the ranks with mlx.launch "
                               f"(docs/distributed.md)") from None


def _check_split(options: PagedMoEOptions, size: int, num_layers: int) -> None:
    split = options.pipeline_split
    if split is not None and (len(split) != size or sum(split) != num_layers):
        raise ParameterError(f"paging.pipeline_split = {split}: needs {size} entries (one per rank) "
                             f"summing to the model's {num_layers} layers", "pipeline_split")
    if size > num_layers:
        raise ParameterError(f"{size} ranks for a model of {num_layers} layers: launch at most "
                             f"{num_layers} ranks", "distributed")


def pipeline_layers(num_layers: int, size: int, rank: int, split: list[int] | None = None) -> range:
    """The layers rank ``rank`` of ``size`` runs, by the arithmetic of mlx-lm's ``pipeline()``: an
    even split with the extra layers on the low ranks (or ``split``), in reverse, so rank 0 runs
    the last layers. The memory plan needs it before the model exists; a test compares it with
    the layers the model's own split gives."""
    if split is None:
        base, extra = divmod(num_layers, size)
        split = [base + (1 if r < extra else 0) for r in range(size)]
    start = sum(split[rank + 1:])
    return range(start, start + split[rank])


def planned_layers(options: PagedMoEOptions, num_layers: int) -> tuple[range, int, int] | None:
    """For the memory plan: this rank's layers, rank and group size under ``distributed =
    "pipeline"`` (joining the group, as loading would), else None."""
    if options.distributed != "pipeline":
        return None
    group = _join(options)
    _check_split(options, group.size(), num_layers)
    return pipeline_layers(num_layers, group.size(), group.rank(), options.pipeline_split), group.rank(), group.size()


def split_pipeline(model: Any, options: PagedMoEOptions, path: Any) -> PipelineShard:
    """Join the distributed group and keep only this rank's layers in ``model`` (nothing is read)."""
    inner = pipeline_model(model)
    if inner is None:
        raise CheckpointError(
            f"{path}: mlx-lm's {type(model).__module__} model has no pipeline(group) split; "
            f"unset paging.distributed for it", str(path))
    group = _join(options)
    num_layers = len(inner.layers)
    _check_split(options, group.size(), num_layers)
    inner.pipeline(group, split=options.pipeline_split)
    shard = PipelineShard(group, group.rank(), group.size(), inner.start_idx, inner.end_idx, num_layers, launch_hosts())
    if shard.size > 1:  # one rank waits for nobody: no extra evaluations
        shard.timer.install(inner.layers[shard.start], inner.layers[shard.end - 1])
    return shard
