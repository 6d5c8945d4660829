"""Serving a pipeline tier from several ranks: rank 0 hands each piece of work to the others.

In an ``mlx.launch``'ed job every rank holds some of the model's layers, so every rank must run
the same forward passes at the same time. Rank 0 runs the HTTP server; before each model action
(load a tier, generate, shut down) it sends the action to the other ranks (the followers, see
:mod:`.pipeline_follower`) through mlx.distributed collectives, and then every rank runs the same
code: ``Runtime.stream_tokens`` on the same tokens, options and seed, so they sample the same
tokens and stop at the same one (budget, end of sequence, stop string). One action runs at a time.

Two things are agreed on with one collective each: whether rank 0's client left (every
:data:`STOP_CHECK_CHUNKS` chunks, one ``all_sum`` on the generation stream, where it runs after
the step mlx-lm computes ahead instead of beside it), and whether every rank can load a tier (their
admission checks, before any rank starts the loader's own collectives). While idle, rank 0 sends
a heartbeat every :data:`HEARTBEAT_SECONDS`, so a follower that died ends the server within seconds
instead of at the next request.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any, Callable, Generator, Iterator

import mlx.core as mx
import numpy as np

from outlier_runtime.core.errors import AdmissionError, DistributedError, OutlierError
from outlier_runtime.core.peers import is_peer_lost, launch_hosts, lost_peer_error
from outlier_runtime.core.results import Chunk, GenerationResult

log = logging.getLogger(__name__)

#: Chunks between two checks of whether rank 0's client left (a check costs one round trip and
#: the overlap of one step; a client that leaves costs at most this many more chunks).
STOP_CHECK_CHUNKS = 8
#: Seconds between two heartbeats while no work runs: how soon a dead follower is noticed.
HEARTBEAT_SECONDS = 1.0


class WorkChannel:
    """Rank 0's messages (small JSON objects) to every rank of an mlx.distributed group."""

    def __init__(self, group: Any, hosts: list[str] | None = None):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.hosts = launch_hosts() if hosts is None else hosts

    def _sum(self, values: mx.array) -> mx.array:
        """``all_sum`` after the generation stream's queued work (a step mlx-lm computed ahead),
        so this exchange never interleaves with a step's sends and receives."""
        from mlx_lm.generate import generation_stream

        try:
            mx.synchronize(generation_stream)
            total = mx.distributed.all_sum(values, group=self.group, stream=mx.cpu)
            mx.eval(total)
        except RuntimeError as exc:
            raise self.explain(exc) from None
        return total

    def exchange(self, message: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's ``message`` on every rank (the others pass None): its length, then its bytes."""
        payload = json.dumps(message).encode() if self.rank == 0 else b""
        length = int(self._sum(mx.array([len(payload)], dtype=mx.int32)).item())
        mine = np.frombuffer(payload, dtype=np.uint8) if self.rank == 0 else np.zeros(length, dtype=np.uint8)
        return json.loads(bytes(np.array(self._sum(mx.array(mine)), dtype=np.uint8)))

    def failing_ranks(self, failed: bool) -> list[int]:
        """The ranks that report a failure (each rank says whether it failed), on every rank."""
        flags = np.zeros(self.size, dtype=np.int32)
        flags[self.rank] = int(failed)
        return [rank for rank, flag in enumerate(np.array(self._sum(mx.array(flags)))) if flag]

    def stop_check(self, stop: bool) -> bool:
        """Whether any rank wants to stop the generation in progress: one ``all_sum`` queued on the
        generation stream, behind the step mlx-lm computes ahead, so it cannot interleave with it."""
        from mlx_lm.generate import generation_stream

        try:
            total = mx.distributed.all_sum(mx.array([int(stop)], dtype=mx.int32), group=self.group,
                                           stream=generation_stream)
            return bool(total.item())
        except RuntimeError as exc:
            raise self.explain(exc) from None

    def explain(self, exc: RuntimeError) -> BaseException:
        """A lost peer as one line naming this rank and the ranks next to it in the ring (the
        ones it talks to); any other error unchanged."""
        if not is_peer_lost(exc):
            return exc
        peers = sorted({(self.rank + 1) % self.size, (self.rank - 1) % self.size} - {self.rank})
        return lost_peer_error(self.rank, self.size, self.hosts, peers, exc,
                               role="follower" if self.rank == 0 else "rank")


def join_group(backend: str = "any") -> WorkChannel | None:
    """The channel to the other ranks of this ``mlx.launch``'ed job; None when this process is
    the only rank."""
    try:
        group = mx.distributed.init(backend=backend)
    except RuntimeError as exc:
        raise DistributedError(f"paging.distributed = \"pipeline\": mlx.distributed cannot start the {backend!r} "
                               f"backend ({exc}); launch the ranks with mlx.launch (docs/distributed.md)") from None
    return WorkChannel(group) if group.size() > 1 else None


def wants_pipeline(*override_sets: dict[str, Any]) -> bool:
    """Whether load overrides (the server's paging ones, or its per-tier ones) ask for
    ``paging.distributed = "pipeline"``: then the server joins the launched job's ranks."""
    def asks(overrides: dict[str, Any]) -> bool:
        return "pipeline" in (overrides.get("distributed"), overrides.get("paging.distributed"))

    return any(asks(overrides) or any(asks(per_tier) for per_tier in overrides.values() if isinstance(per_tier, dict))
               for overrides in override_sets)


def lockstep(chunks: Generator[Chunk, None, GenerationResult], channel: WorkChannel,
             leaving: Callable[[], bool] = lambda: False) -> Generator[Chunk, None, GenerationResult | None]:
    """``chunks`` (one rank's ``stream_tokens``), stopped on every rank at the same chunk when
    rank 0's ``leaving()`` says its client left. Closed early on rank 0, it runs on to the next
    check, so the others stop there too; on the followers ``leaving`` stays False."""
    count, closed = 0, False
    try:
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as done:
                return done.value  # every rank ends here at the same token
            count += 1
            if not closed:
                try:
                    yield chunk
                except GeneratorExit:
                    closed = True  # no more yields; run on to the next check without them
            if count % STOP_CHECK_CHUNKS == 0 and channel.stop_check(closed or leaving()):
                return None
    finally:
        chunks.close()


class PipelineLeader:
    """Rank 0's side: each model action of the server is sent to the followers, then run here."""

    def __init__(self, channel: WorkChannel, load_overrides: Callable[[str], dict[str, Any]], force: bool):
        self.channel = channel
        self._load_overrides = load_overrides
        self._force = force
        #: Held while an action runs: the heartbeat never slips between an action's collectives.
        self._lock = threading.Lock()
        self._last_action = time.monotonic()
        self._stopping = threading.Event()
        #: The error that ended the job (a lost follower); set once.
        self.lost: DistributedError | None = None
        #: Called (from any thread) once a follower is lost: the server stops.
        self.on_lost: Callable[[DistributedError], None] = lambda error: None
        self._heartbeat = threading.Thread(target=self._beat, name="outlier-pipeline-heartbeat", daemon=True)

    def start(self) -> None:
        self._heartbeat.start()

    def _send(self, message: dict[str, Any]) -> None:
        self._guarded(self.channel.exchange, message)

    def _guarded(self, action: Callable[..., Any], *args: Any) -> Any:
        if self.lost is not None:
            raise self.lost
        try:
            return action(*args)
        except DistributedError as exc:
            self._lose(exc)
            raise
        finally:
            self._last_action = time.monotonic()

    def _lose(self, error: DistributedError) -> None:
        if self.lost is None:
            self.lost = error
            self.on_lost(error)

    def switch(self, tier: str, unload: Callable[[], None]) -> Any:
        """Every rank closes its tier and loads ``tier``; raises AdmissionError (and loads nothing)
        when a rank's admission checks refuse it."""
        import outlier_runtime
        from outlier_runtime.core.runtime import admit

        with self._lock:
            self._send({"kind": "load", "tier": tier})
            unload()
            try:
                admit(tier, force=self._force, **self._load_overrides(tier))
                refused = None
            except OutlierError as exc:
                refused = exc
            failing = self._guarded(self.channel.failing_ranks, refused is not None)
            if refused is not None:
                raise refused
            if failing:
                raise AdmissionError(f"tier {tier}: rank(s) {', '.join(map(str, failing))} of this pipeline "
                                     f"cannot load it (see their output); nothing was loaded")
            try:
                return self._guarded(lambda: outlier_runtime.load(tier, force=self._force, **self._load_overrides(tier)))
            except OutlierError as exc:
                # The followers are inside the loader's collectives: a load failing here alone ends the job.
                error = exc if isinstance(exc, DistributedError) else DistributedError(
                    f"rank 0 of {self.channel.size}: tier {tier} failed to load here after every rank admitted "
                    f"it ({exc}); the other ranks cannot go on without it")
                self._lose(error)
                raise error from None

    def stream(self, runtime: Any, tokens: list[int], max_tokens: int, options: dict[str, Any],
               leaving: Callable[[], bool]) -> Iterator[Chunk]:
        """Every rank generates from ``tokens``; yields rank 0's chunks (its result, as usual, in
        ``runtime.last_result``). Sampling without a seed gets one here, the same on every rank."""
        options = {**options, "seed": options.get("seed")}
        if options["seed"] is None:
            options["seed"] = random.getrandbits(31)
        # What the followers get back from JSON (lists for tuples, string keys), used here too:
        # a rank sampling with other options would feed the pipeline other tokens.
        options = json.loads(json.dumps(options))
        with self._lock:
            self._send({"kind": "generate", "tokens": list(tokens), "max_tokens": max_tokens, "options": options})
            chunks = lockstep(runtime.stream_tokens(tokens, max_tokens=max_tokens, **options), self.channel, leaving)
            try:
                yield from _guard_each(chunks, self)
            finally:
                chunks.close()
                self._last_action = time.monotonic()

    def shutdown(self) -> bool:
        """Tell the followers to close their tier and exit; False when they cannot be told (a
        follower is lost), and then this rank must not close its own tier (that waits on them)."""
        self._stopping.set()
        with self._lock:
            if self.lost is not None:
                return False
            try:
                self._send({"kind": "shutdown"})
            except DistributedError:
                return False
            return True

    def _beat(self) -> None:
        while not self._stopping.wait(HEARTBEAT_SECONDS / 4):
            if time.monotonic() - self._last_action < HEARTBEAT_SECONDS or not self._lock.acquire(blocking=False):
                continue
            try:
                if self.lost is None and not self._stopping.is_set():
                    self._send({"kind": "ping"})
            except DistributedError as exc:
                log.debug("heartbeat: %s", exc)
                return
            finally:
                self._lock.release()


def _guard_each(chunks: Iterator[Chunk], leader: PipelineLeader) -> Generator[Chunk, None, None]:
    """``chunks``, with a lost follower found while generating ending the job like any other."""
    try:
        yield from chunks
    except DistributedError as exc:
        leader._lose(exc)
        raise
