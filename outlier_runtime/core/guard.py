"""Every call into a plugin goes through a guard, so a broken plugin is named, never a mystery.

An exception inside a plugin (other than the project's own errors, which already say what
went wrong) becomes a ``PluginError`` naming the plugin and its distribution. Results are
checked where the engine depends on them: a cache policy's victim must be one of the
candidates it was offered. The engine's callers hold their locks with ``with`` blocks, so a
guard's error unwinds them and leaves the caches as they were before the bad call.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Hashable, Sequence, TypeVar

from outlier_runtime.core.errors import OutlierError, PluginError
from outlier_runtime.core.protocols import CachePolicy, Prefetcher, Reader, ReadRequest

T = TypeVar("T")


class PluginGuard:
    """Names one registered plugin thing in errors and runs calls into it."""

    def __init__(self, kind: str, name: str, plugin: str, distribution: str | None):
        self.kind, self.name, self.plugin, self.distribution = kind, name, plugin, distribution

    def describe(self) -> str:
        origin = f"plugin {self.plugin!r}"
        if self.distribution:
            origin += f", distribution {self.distribution!r}"
        return f"{self.kind.replace('_', ' ')} {self.name!r} ({origin})"

    def error(self, problem: str) -> PluginError:
        return PluginError(f"{self.describe()} {problem}. Fix or uninstall the plugin, or pick another "
                           f"{self.kind.replace('_', ' ')} in the manifest.")

    def call(self, method: str, function: Callable[..., T], *args: Any) -> T:
        try:
            return function(*args)
        except OutlierError:
            raise
        # SystemExit too: a plugin must not end the process (it would exit 0 with no output).
        except (Exception, SystemExit) as exc:
            raise self.error(f"failed in {method}(): {type(exc).__name__}: {exc}") from exc


class GuardedPolicy:
    """A cache policy whose every call is guarded and whose victims are checked."""

    def __init__(self, policy: CachePolicy, guard: PluginGuard):
        self.policy = policy
        self.guard = guard

    def accessed(self, key: Hashable) -> None:
        self.guard.call("accessed", self.policy.accessed, key)

    def evicted(self, key: Hashable) -> None:
        self.guard.call("evicted", self.policy.evicted, key)

    def choose_victim(self, candidates: Collection[Hashable]) -> Hashable:
        victim = self.guard.call("choose_victim", self.policy.choose_victim, candidates)
        try:
            offered = victim in candidates
        except TypeError:  # an unhashable result
            offered = False
        if not offered:
            raise self.guard.error(f"returned {victim!r} from choose_victim(), which is not one of the "
                                   f"{len(candidates)} candidates it was offered (pinned or uncached keys "
                                   f"are never candidates)")
        return victim

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the protocol (counters a policy keeps) is read from the policy itself.
        return _inner_attribute(self, "policy", name)


class GuardedReader:
    """A reader whose unexpected failures name the plugin (``ExpertReadError`` passes through)."""

    def __init__(self, reader: Reader, guard: PluginGuard):
        self.reader = reader
        self.guard = guard

    def read(self, requests: Sequence[ReadRequest]) -> None:
        self.guard.call("read", self.reader.read, requests)

    def close(self) -> None:
        self.guard.call("close", self.reader.close)

    @property
    def stats(self) -> dict[str, Any]:
        return getattr(self.reader, "stats", {})

    def __getattr__(self, name: str) -> Any:
        return _inner_attribute(self, "reader", name)


class GuardedPrefetcher:
    """A prefetcher whose calls are guarded and whose guesses are checked to be expert ids."""

    def __init__(self, prefetcher: Prefetcher, guard: PluginGuard):
        self.prefetcher = prefetcher
        self.guard = guard

    def predict(self, layer: int, hidden: Any, next_block: Any) -> Any:
        return self.guard.call("predict", self.prefetcher.predict, layer, hidden, next_block)

    @property
    def guess(self) -> Callable[..., Any] | None:
        """The prefetcher's optional lazy ``guess``, guarded; None when it has none."""
        inner = getattr(self.prefetcher, "guess", None)
        if not callable(inner):
            return None
        return lambda layer, hidden, next_block: self.guard.call("guess", inner, layer, hidden, next_block)

    def check_ids(self, layer: int, guess: Any, num_experts: int) -> list[int]:
        """``guess`` as expert ids of layer ``layer + 1``, or a PluginError saying what it was."""
        try:
            ids = [int(e) for e in guess]
        except (TypeError, ValueError):
            raise self.guard.error(f"guessed {guess!r}, not a sequence of expert ids") from None
        if any(not 0 <= e < num_experts for e in ids):
            raise self.guard.error(f"guessed expert ids {ids}; layer {layer + 1} has experts 0..{num_experts - 1}")
        return ids

    def __getattr__(self, name: str) -> Any:
        return _inner_attribute(self, "prefetcher", name)


def _inner_attribute(wrapper: object, inner: str, name: str) -> Any:
    if name == inner or inner not in vars(wrapper):  # half-built wrapper (copy, pickle): no recursion
        raise AttributeError(name)
    return getattr(vars(wrapper)[inner], name)


GUARDS = {"cache_policy": GuardedPolicy, "reader": GuardedReader, "prefetcher": GuardedPrefetcher}
