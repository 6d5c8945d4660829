"""The server's model thread (serve/model_thread.py): calls run in order on one thread, an error
reaches its caller, and once shut down it takes no new call, finishes the submitted ones and
stays parked (alive, a daemon) instead of ending; a process whose parked thread ran mlx's
compiled functions still exits at once with status 0."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from outlier_runtime.serve.model_thread import ModelThread

#: Seconds any wait in these tests may take (they take milliseconds).
DEADLINE = 30


def test_calls_run_in_order_on_one_thread():
    worker = ModelThread("outlier-test-model")
    gate = threading.Event()
    seen: list[tuple[int, str]] = []
    first = worker.submit(gate.wait, DEADLINE)
    later = [worker.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(5)]
    assert seen == []  # every call waits behind the first one
    gate.set()
    assert first.result(timeout=DEADLINE) is True
    for future in later:
        future.result(timeout=DEADLINE)
    assert seen == [(i, "outlier-test-model") for i in range(5)]


def test_an_error_reaches_its_caller_and_the_thread_goes_on():
    worker = ModelThread()
    failed = worker.submit(int, "not a number")
    with pytest.raises(ValueError, match="not a number"):
        failed.result(timeout=DEADLINE)
    assert worker.submit(int, "7").result(timeout=DEADLINE) == 7


def test_after_shutdown_the_submitted_calls_run_and_the_thread_stays_parked():
    worker = ModelThread()
    gate = threading.Event()
    worker.submit(gate.wait, DEADLINE)
    last = worker.submit(lambda: "done")
    worker.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        worker.submit(print)
    gate.set()
    assert last.result(timeout=DEADLINE) == "done"
    thread = worker._thread
    thread.join(timeout=1.0)  # an executor's thread would end here; this one parks
    assert thread.is_alive() and thread.daemon


def test_a_process_with_a_parked_thread_that_ran_compiled_mlx_work_exits_cleanly():
    script = textwrap.dedent("""
        import mlx.core as mx
        from outlier_runtime.serve.model_thread import ModelThread

        square = mx.compile(lambda x: x * x)  # fills the calling thread's compile cache
        worker = ModelThread()
        done = worker.submit(lambda: square(mx.array([3.0])).item())
        worker.shutdown()
        assert done.result(timeout=30) == 9.0
        print("finished")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE)
    assert run.returncode == 0 and run.stdout.strip() == "finished", run.stderr[-3000:]
