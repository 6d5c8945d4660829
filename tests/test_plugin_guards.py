"""A misbehaving plugin is named in a PluginError; the engine neither hangs nor corrupts its caches."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import outlier_runtime
from outlier_runtime import PluginError, hookimpl
from outlier_runtime.core.guard import GuardedPolicy, PluginGuard
from outlier_runtime.core.plugin_manager import get_registry, register_plugin
from outlier_cache_lru import LRUPolicy
from outlier_paged_moe.records import RecordPool
from outlier_paged_moe.store import RamCache

from helpers import assert_slots_hold_true_experts, paged_store

PROMPT = "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"
#: Generous: a hang is what these tests catch, and a correct run takes about a second.
DEADLINE_S = 60


class WrongVictim(LRUPolicy):
    """Names a key it was not offered (an uncached or a pinned expert)."""

    def choose_victim(self, candidates):
        return (999, 999)


class Raising(LRUPolicy):
    def choose_victim(self, candidates):
        raise RuntimeError("policy bug")


class ReturnsNone(LRUPolicy):
    def choose_victim(self, candidates):
        return None


class ExitsTheProcess(LRUPolicy):
    def choose_victim(self, candidates):
        raise SystemExit(0)


class PinnedVictim(LRUPolicy):
    """Returns a resident expert it was not offered: one the current step needs (pinned)."""

    def choose_victim(self, candidates):
        return next((key for key in reversed(self._order) if key not in candidates), next(iter(candidates)))


BROKEN = {"wrong-victim": WrongVictim, "raising": Raising, "returns-none": ReturnsNone,
          "exits": ExitsTheProcess, "pinned-victim": PinnedVictim}
#: Broken in a way any generation meets (the pinned case needs a particular sequence of steps).
BROKEN_ALWAYS = sorted(set(BROKEN) - {"pinned-victim"})


class BrokenPolicies:
    @hookimpl
    def register_cache_policies(self, register):
        for name, policy in BROKEN.items():
            register(name, policy, f"A broken policy: {name}.")


def _in_thread_with_deadline(work):
    """Run ``work`` (load, generate, check) in one thread: a hang fails the test instead of
    stalling the suite. mlx streams belong to the thread that made them, so all of it runs there."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came out
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), "generation hung inside a broken plugin"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _expect_plugin_error(path, **overrides) -> PluginError:
    """Load the paged tier with ``overrides``, generate, and return the PluginError it raised."""

    def work():
        runtime = outlier_runtime.load("plus", model=str(path), force=True, **overrides)
        try:
            with pytest.raises(PluginError) as caught:
                runtime.generate(PROMPT, max_tokens=6, temperature=0.0, chat=False)
            store = paged_store(runtime)
            assert store._lock.acquire(blocking=False)  # released on the way out
            store._lock.release()
            assert_slots_hold_true_experts(runtime)  # no slot marked valid holds wrong bytes
            return caught.value
        finally:
            runtime.close()

    return _in_thread_with_deadline(work)


@pytest.mark.parametrize("name", BROKEN_ALWAYS)
def test_a_broken_policy_in_the_slot_path_is_named_and_the_store_stays_consistent(tiny, name):
    register_plugin(BrokenPolicies(), "broken-policies")
    # One slot per layer and no RAM cache: every step beyond the first must evict.
    error = _expect_plugin_error(tiny("qwen3_moe"), k_override=1, cache_gb=0, cache_policy=name)
    assert f"cache policy {name!r} (plugin 'broken-policies')" in str(error)
    assert "choose_victim" in str(error)


def test_a_pinned_victim_is_refused_and_the_pinned_expert_stays(tiny):
    register_plugin(BrokenPolicies(), "broken-policies")

    def work():
        runtime = outlier_runtime.load("plus", model=str(tiny("qwen3_moe")), k_override=2, cache_gb=1,
                                       cache_policy="pinned-victim", force=True)
        try:
            store = paged_store(runtime)
            store.ensure(0, np.array([0, 1]))
            # Expert 1 is needed again (pinned); 0 is the only candidate, the policy names 1.
            with pytest.raises(PluginError, match="cache policy 'pinned-victim'.*not one of the 1 candidates"):
                store.ensure(0, np.array([1, 2]))
            assert 1 in store.layers[0].slot_of and 2 not in store.layers[0].slot_of
            assert_slots_hold_true_experts(runtime)
        finally:
            runtime.close()

    _in_thread_with_deadline(work)


@pytest.mark.parametrize("name", ["wrong-victim", "raising", "returns-none"])
def test_a_broken_policy_in_the_ram_cache_fails_instead_of_looping(name):
    pool = RecordPool()
    policy = GuardedPolicy(BROKEN[name](), PluginGuard("cache_policy", name, "t", None))
    cache = RamCache(budget=2 * 4096, policy=policy, pool=pool)
    cache.put((0, 1), pool.take(4096))
    cache.put((0, 2), pool.take(4096))
    with pytest.raises(PluginError, match=f"cache policy {name!r}"):
        cache.make_room(4096)  # full: a third record needs a victim
    assert pool.held == cache.used == 2 * 4096 and (0, 1) in cache and (0, 2) in cache


def test_an_exception_in_a_register_hook_names_the_plugin():
    class Broken:
        @hookimpl
        def register_readers(self, register):
            raise ValueError("oops")

    register_plugin(Broken(), "broken-register")
    with pytest.raises(PluginError, match=r"plugin 'broken-register'.*register_readers.*ValueError: oops"):
        get_registry()


class FailingReader:
    def read(self, requests):
        raise TypeError("reader bug")

    def close(self):
        pass


class BadPrefetcher:
    def predict(self, layer, hidden, next_block):
        return [10_000]


class ReaderAndPrefetcher:
    @hookimpl
    def register_readers(self, register):
        register("failing", FailingReader)

    @hookimpl
    def register_prefetchers(self, register):
        register("out-of-range", BadPrefetcher)


def test_a_reader_bug_is_a_plugin_error_naming_the_reader(tiny):
    register_plugin(ReaderAndPrefetcher(), "reader-and-prefetcher")
    error = _expect_plugin_error(tiny("qwen3_moe"), k_override=2, cache_gb=0, reader="failing")
    assert "reader 'failing' (plugin 'reader-and-prefetcher') failed in read(): TypeError: reader bug" in str(error)


def test_a_prefetcher_guessing_ids_that_do_not_exist_is_named(tiny):
    register_plugin(ReaderAndPrefetcher(), "reader-and-prefetcher")
    error = _expect_plugin_error(tiny("qwen3_moe"), k_override=8, cache_gb=1, prefetcher="out-of-range")
    assert "prefetcher 'out-of-range'" in str(error) and "[10000]" in str(error)
