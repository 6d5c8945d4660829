"""Continuous batching in the server: concurrent requests to the loaded tier decode together.

The :class:`BatchScheduler` runs on the model host's worker thread. A request that can be
batched (see :func:`~outlier_runtime.core.batch_generation.unbatchable_reason`) starts a
:class:`~outlier_runtime.core.batch_generation.ContinuousBatch`; before every step, queued
requests for the same tier join it (up to ``max_batch`` sequences), each streaming its own
chunks and finishing on its own. The first queued request that cannot join (another tier, a
seeded sampling request) waits until the batch has drained, so requests still start in arrival
order. A client that leaves is dropped from the batch at the next step.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from outlier_runtime.core.batch_generation import BatchSequence, ContinuousBatch, model_can_batch, request_reason
from outlier_runtime.core.images import has_images

if TYPE_CHECKING:
    from outlier_runtime.core.runtime import Runtime
    from outlier_runtime.serve.model_host import GenerationJob, ModelHost, PreparedJob

log = logging.getLogger(__name__)

#: ``outlier serve --max-batch``: requests decoded together at most (1 turns batching off).
DEFAULT_MAX_BATCH = 8
MAX_BATCH_LIMIT = 64


class BatchScheduler:
    """Decides which requests are batched and runs a batch until its last request is done."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self._lock = threading.Lock()
        #: Counters only (the stats route shows them): how much decoding was shared.
        self.counters = {"max_batch": max_batch, "batches": 0, "decode_steps": 0, "batched_steps": 0,
                         "largest_batch": 0, "batched_requests": 0, "unbatched_requests": 0}
        #: Whether each loaded model can batch at all, asked once per Runtime.
        self._model_reasons: weakref.WeakKeyDictionary[Runtime, str | None] = weakref.WeakKeyDictionary()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.counters)

    def accepts(self, runtime: Runtime, job: GenerationJob) -> bool:
        """Whether ``job`` can decode in a batch on ``runtime`` (else it is generated alone)."""
        return self.max_batch > 1 and self._reason(runtime, job) is None

    def _reason(self, runtime: Runtime, job: GenerationJob) -> str | None:
        if runtime not in self._model_reasons:
            self._model_reasons[runtime] = model_can_batch(runtime)
        if has_images(job.prompt):
            return "a request with images is generated alone (its pixels are prefilled with its prompt)"
        return request_reason(runtime, job.options) or self._model_reasons[runtime]

    def serve(self, host: ModelHost, first: PreparedJob) -> bool:
        """Decode ``first`` in a batch with every queued request that can join, until all are done;
        False (nothing done) when ``first`` must be generated alone.

        Every job the batch took gets its reply (done, error or cancelled) and is released from
        the host's queue bound; an error in a step fails every job then in the batch.
        """
        runtime = first.runtime
        reason = None if self.max_batch <= 1 else self._reason(runtime, first.job)
        if self.max_batch <= 1 or reason is not None:
            if reason is not None:
                log.info("tier %s: a request generated alone: %s", runtime.name, reason)
            self._count("unbatched_requests")
            return False
        self._run(host, first)
        return True

    def _run(self, host: ModelHost, first: PreparedJob) -> None:
        runtime = first.runtime
        batch = ContinuousBatch(runtime, self.max_batch, host.prompt_cache)
        members: dict[BatchSequence, GenerationJob] = {}
        self._count("batches")
        try:
            joining: PreparedJob | None = first
            while joining is not None or members:
                while joining is not None:
                    self._join(batch, members, joining, host)
                    joining = host.next_for_batch(runtime) if len(members) < self.max_batch else None
                for sequence, job in list(members.items()):
                    if job.cancelled.is_set():
                        log.info("client disconnected: stopped generating on tier %s", runtime.name)
                        batch.cancel(sequence)
                        del members[sequence]
                        host.drop_cancelled(job)
                if members:
                    self._step(batch, members, host)
                if len(members) < self.max_batch:
                    joining = host.next_for_batch(runtime)
        except Exception as exc:  # noqa: BLE001 - a failed step fails the requests in it
            for job in members.values():
                host.report_error(job, exc)
                host.release(job)
        finally:
            batch.close()

    def _join(self, batch: ContinuousBatch, members: dict[BatchSequence, GenerationJob], prepared: PreparedJob,
              host: ModelHost) -> None:
        job = prepared.job
        try:
            sequence = batch.add(prepared.tokens, max_tokens=prepared.budget, **job.options)
        except Exception as exc:  # noqa: BLE001 - this request's error reply; the batch goes on
            host.report_error(job, exc)
            host.release(job)
            return
        members[sequence] = job
        self._count("batched_requests")

    def _step(self, batch: ContinuousBatch, members: dict[BatchSequence, GenerationJob], host: ModelHost) -> None:
        before = (batch.decode_steps, batch.batched_steps)
        events = batch.step()
        with self._lock:
            self.counters["decode_steps"] += batch.decode_steps - before[0]
            self.counters["batched_steps"] += batch.batched_steps - before[1]
            self.counters["largest_batch"] = max(self.counters["largest_batch"], batch.largest_batch)
        for event in events:
            job = members[event.sequence]
            if event.chunk is not None:
                job.emit("chunk", event.chunk)
            if event.result is not None:
                del members[event.sequence]
                host.finish(job, batch.runtime, event.result)
                host.release(job)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1
