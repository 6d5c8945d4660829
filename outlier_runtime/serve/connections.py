"""Connections: a bounded number, each with a deadline for its request head, and quiet logs.

Sockets that send their headers a byte at a time (slowloris) used to hold descriptors until
the process ran out, then asyncio logged an accept error in a tight loop. Here:

- the descriptor soft limit is raised to the hard limit (mlx-lm lowers it at import);
- at most ``max_connections`` connections are kept: past that, the oldest connection that is
  not in the middle of a request (still sending its head, or idle between requests) is closed
  to admit the new one, and if every connection is busy the new one is closed at once;
- a connection must complete each request head within ``head_timeout`` seconds;
- a message logged again and again is logged a few times per interval, then counted.
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HEAD_TIMEOUT = 10.0
#: Descriptors kept free of connections: model shards, pack files, pipes, the listening socket.
FD_RESERVE = 512

log = logging.getLogger(__name__)


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if sys.platform == "darwin":
        target = min(target, 10240)  # OPEN_MAX: macOS refuses more for one process
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(wanted: int, fd_limit: int) -> int:
    """At most ``wanted`` connections, and never so many that the process runs out of descriptors."""
    if fd_limit == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, fd_limit - FD_RESERVE))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request-head deadline.

    Configure with :func:`guarded_protocol`, which returns a subclass with the limits set.
    """

    max_connections = DEFAULT_MAX_CONNECTIONS
    head_timeout = DEFAULT_HEAD_TIMEOUT

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: Any = None
        self._idle_since = self.loop.time()
        if len(self.connections) > self.max_connections and not self._evict_one():
            log.warning("connection limit (%d) reached with every connection busy: refused a new one",
                        self.max_connections)
            self.transport.close()
            return
        self._await_head()

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _evict_one(self) -> bool:
        """Close the oldest connection that is not serving a request; False if there is none."""
        victim = None
        for other in self.connections:
            if other is self or not isinstance(other, GuardedH11Protocol) or other._busy():
                continue
            if other.transport.is_closing():
                continue
            if victim is None or other._idle_since < victim._idle_since:
                victim = other
        if victim is None:
            return False
        victim.transport.close()
        return True

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._idle_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._busy() and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._busy():
            self._cancel_head_timer()  # the head is in: the body has its own deadline (guard.py)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def guarded_protocol(max_connections: int, head_timeout: float) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "head_timeout": head_timeout})


class RepeatFilter(logging.Filter):
    """Let a message (by logger and format string) through ``burst`` times per ``interval`` seconds.

    The rest are counted and summed up in one line when the next interval lets it through, so a
    failure that repeats thousands of times a second cannot fill the disk with tracebacks.
    """

    def __init__(self, burst: int = 5, interval: float = 10.0):
        super().__init__()
        self.burst = burst
        self.interval = interval
        self._seen: dict[tuple[str, Any], list[float | int]] = {}  # key -> [window start, count, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        now = time.monotonic()
        with self._lock:
            window = self._seen.get(key)
            if window is None or now - window[0] >= self.interval:
                dropped = int(window[2]) if window else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 1000:  # many distinct messages: forget the old windows
                    self._seen = {key: self._seen[key]}
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this in the last {self.interval:g} s]"
                return True
            window[1] += 1
            if window[1] <= self.burst:
                return True
            window[2] += 1
            return False


def install_repeat_filter(loggers: tuple[str, ...] = ("", "uvicorn", "uvicorn.access")) -> RepeatFilter:
    """Attach one :class:`RepeatFilter` to every handler of these loggers (root, uvicorn's).

    On the handlers, not the loggers: a logger's filter misses records from its children.
    Call it after uvicorn has configured its logging.
    """
    repeat = RepeatFilter()
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(repeat)
    if not logging.getLogger().handlers:  # records would go to logging.lastResort, unfiltered
        handler = logging.StreamHandler()
        handler.addFilter(repeat)
        logging.getLogger().addHandler(handler)
    return repeat
