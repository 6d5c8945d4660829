"""A follower rank of a served pipeline: run what rank 0 sends, in step with it, until it says stop.

Rank 0 runs the HTTP server (:mod:`.pipeline_work` holds its side and the messages); every other
rank of the ``mlx.launch``'ed job runs :func:`follow`: it waits for rank 0's next action, loads
the same tier with the same overrides, runs the same generation (its own layers; the tokens it
samples are rank 0's and go nowhere), and exits when rank 0 shuts down. A lost rank 0 ends it
with one line (:class:`DistributedError`), like any lost peer.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable

from outlier_runtime.core.errors import DistributedError, OutlierError
from outlier_runtime.serve.pipeline_work import WorkChannel, lockstep

log = logging.getLogger(__name__)


def follow(channel: WorkChannel, load_overrides: Callable[[str], dict[str, Any]], force: bool) -> None:
    """Follow rank 0's actions until it shuts down (returns) or is lost (raises DistributedError)."""
    import outlier_runtime
    from outlier_runtime.core.runtime import admit

    # Ctrl-C in the terminal reaches every local rank: rank 0 ends the job, and tells this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info("rank %d of %d: following rank 0", channel.rank, channel.size)
    runtime = None
    while True:
        action = channel.exchange(None)
        kind = action["kind"]
        if kind == "shutdown":
            _close(runtime)  # with rank 0, which closes its own now
            return
        if kind == "load":
            runtime = _close(runtime)
            tier = action["tier"]
            try:
                admit(tier, force=force, **load_overrides(tier))
                refused = None
            except OutlierError as exc:
                refused = exc
                log.error("rank %d cannot load tier %s: %s", channel.rank, tier, exc)
            if not channel.failing_ranks(refused is not None):
                # A load failing here alone ends the job: rank 0 is inside the loader's collectives.
                runtime = outlier_runtime.load(tier, force=force, **load_overrides(tier))
        elif kind == "generate":
            if runtime is None:
                raise DistributedError(f"rank {channel.rank}: rank 0 sent a generation with no tier loaded")
            chunks = lockstep(runtime.stream_tokens(action["tokens"], max_tokens=action["max_tokens"],
                                                    **action["options"]), channel)
            try:
                for _ in chunks:
                    pass
            except DistributedError:
                raise
            except OutlierError as exc:  # rank 0 met the same error before any collective
                log.warning("rank %d: generation refused: %s", channel.rank, exc)
        # "ping": rank 0's heartbeat; nothing to do.


def _close(runtime: Any) -> None:
    """Close a tier (every rank closes it together: it waits for the others' last step)."""
    if runtime is not None:
        runtime.close()
    return None

