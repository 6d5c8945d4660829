"""The thread that runs the server's model work: calls in the order submitted, and never ended.

mlx keeps per-thread state that holds Python objects: each thread's ``mx.compile`` cache
(mlx-lm's compiled activations and samplers) and its random key. When a thread ends, C++
thread-local destructors free that state and must take the GIL to do it. A server's worker
thread ends when the server stops, moments before the interpreter finalizes; on a loaded
machine its destructors can run after finalization began, Python then ends the thread from
inside one of them, and the C++ runtime aborts the whole process ("terminate called without
an active exception", exit -6: a served pipeline's rank 0 reported as failed). So after
:meth:`ModelThread.shutdown` the thread finishes the calls already submitted and then waits on
a lock nobody releases: a daemon thread the interpreter neither joins nor wakes, whose mlx
state goes with the process (at most one such thread per server).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class ModelThread:
    """A one-thread executor (``submit``/``shutdown`` as ``ThreadPoolExecutor``'s) whose thread
    is parked, not ended, once shut down. The thread starts with the first call."""

    def __init__(self, name: str = "outlier-model"):
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shut_down = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the thread after the calls submitted before it; its Future."""
        future: Future = Future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._calls.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Refuse new calls; the ones already submitted still run, then the thread parks."""
        with self._lock:
            self._shut_down = True
            self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            self._call(*call)
        threading.Event().wait()  # parked for good (see the module's docstring)

    @staticmethod
    def _call(future: Future, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the Future
            future.set_exception(exc)
        else:
            future.set_result(result)
