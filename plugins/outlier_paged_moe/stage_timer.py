"""How long a pipeline rank waits for the others, apart from the time its own layers take.

mlx-lm's pipeline runs the receive, the rank's layers, the send and the final ``all_gather`` as
operations of one lazy graph: timing the step as a whole cannot tell waiting from computing. The
timer evaluates the input of the rank's first layer and the output of its last layer, and times
both: the first is the time blocked until the input is there (the previous stage's hidden state;
on the first stage, the previous token, which comes after the whole previous step of every rank),
the second the rank's own layers. A paged tier already waits on the host inside every MoE layer
(it learns the routed experts there), so the two extra evaluations per step cost little.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx


class StageTimer:
    """Seconds a rank spent waiting for its first layer's input, and in its own layers."""

    def __init__(self) -> None:
        self.wait_seconds = 0.0
        self.layers_seconds = 0.0
        self._input_ready = 0.0

    def reset(self) -> None:
        self.wait_seconds = self.layers_seconds = 0.0

    def install(self, first: Any, last: Any) -> None:
        """Time the rank's first and last decoder layers (the same one when it has one)."""
        _time_calls(first, before=self._before)
        _time_calls(last, after=self._after)

    def _before(self, x: Any) -> None:
        started = time.perf_counter()
        mx.eval(x)
        self._input_ready = time.perf_counter()
        self.wait_seconds += self._input_ready - started

    def _after(self, out: Any) -> None:
        mx.eval(out)
        self.layers_seconds += time.perf_counter() - self._input_ready


def _time_calls(layer: Any, before: Callable[[Any], None] | None = None,
                after: Callable[[Any], None] | None = None) -> None:
    """Give ``layer`` a class of its own that calls ``before(input)`` and ``after(output)`` around
    its own call. Its parameters and their names stay as they are (a wrapping module would rename
    them, and the expert index finds layers by name)."""
    base = type(layer)

    def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(x)
        out = base.__call__(self, x, *args, **kwargs)
        if after is not None:
            after(out)
        return out

    layer.__class__ = type(f"Timed{base.__name__}", (base,), {"__call__": __call__})
