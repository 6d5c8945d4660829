"""How an MoE model routes held-out text, and how well an expert cache would serve it.

    outlier routing MODEL_DIR --out OUT_DIR

Loads the model with stock ``mlx_lm.load``, records the expert ids every ``SwitchGLU`` /
``SwitchMLP`` receives (found by type, whatever the attribute is called) while the model reads
held-out text, and reports per MoE layer: expert usage, how many of a token's experts the
previous token also used, and the hit rate of a per-layer expert cache against its size for
each cache policy in the plugin registry, with Belady's perfect-foresight optimum as ceiling.
"""

from __future__ import annotations

import json
import time
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from outlier_runtime.core.errors import OutlierError
from outlier_runtime.engine.experts import find_switch_modules
from outlier_runtime.core.system import provenance

DEFAULT_FRACTIONS = (0.05, 0.10, 0.25, 0.50, 0.75)


class RoutingReportError(OutlierError):
    """The model has no expert layers, or there is no held-out text to run through it."""


# --- recording the routed experts -------------------------------------------------------

def num_experts(module) -> int:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    for _, child in module.named_modules():
        if isinstance(child, (SwitchLinear, QuantizedSwitchLinear)):
            return child.num_experts
    raise RoutingReportError(f"{type(module).__name__} has no SwitchLinear inside; cannot tell its expert count")


@contextmanager
def recording_routes(modules: Sequence[object]) -> Iterator[list[list]]:
    """Record the ``indices`` each module is called with; yields one list of arrays per module.

    Python looks ``__call__`` up on the class, so each instance gets a one-off subclass whose
    ``__call__`` records and delegates; the original classes are restored on exit.
    """
    records: list[list] = [[] for _ in modules]
    originals = [type(module) for module in modules]
    try:
        for module, cls, record in zip(modules, originals, records):
            def __call__(self, x, indices, _cls=cls, _record=record):
                _record.append(indices)
                return _cls.__call__(self, x, indices)

            module.__class__ = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
        yield records
    finally:
        for module, cls in zip(modules, originals):
            module.__class__ = cls


def held_out_texts(model_path: Path) -> list[str]:
    """The validation files named in the model's provenance.json (the demo model's held-out split)."""
    provenance = model_path / "provenance.json"
    if not provenance.is_file() and (model_path / "geometry.json").is_file():
        # `outlier bench`'s model (outlier_runtime/bench/model.py): random weights, no training
        # split; any text of its tokenizer routes the way its random routers route.
        from outlier_runtime.testing.tiny_models import tokenizer_corpus

        return [path.read_text(encoding="utf-8", errors="replace") for path in tokenizer_corpus() if path.is_file()]
    if not provenance.is_file():
        raise RoutingReportError(
            f"{provenance} not found: pass texts=[...] to routing_report, or use a model trained by "
            f"tools/train_demo_moe.py, whose provenance.json lists its validation files."
        )
    names = json.loads(provenance.read_text())["corpus"]["validation_files"]
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8", errors="replace")
             for name in names if (root / name).is_file()]
    if not texts:
        raise RoutingReportError(
            f"None of the {len(names)} validation files in {provenance} exist under {root} "
            f"(another Python version?); pass texts=[...] to routing_report."
        )
    return texts


def collect_routes(model, tokenizer, texts: Sequence[str], *, max_tokens: int, segments: int = 8,
                   chunk_tokens: int = 32) -> tuple[list[np.ndarray], list[str], list[int], list[int]]:
    """Run held-out text through ``model``; return per MoE layer an int array [tokens, top_k].

    The text is ``segments`` contiguous runs (one per file, files spread over the list), each
    read with its own prompt cache in chunks of ``chunk_tokens``: on CPU, small chunks with a
    cache are ~2.5x faster than one long forward. Also returns the layer names, expert counts
    and the token offsets where segments start.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    sites = find_switch_modules(model)
    if not sites:
        raise RoutingReportError(
            f"{type(model).__name__} has no SwitchGLU or SwitchMLP modules: not an MoE model mlx-lm builds with switch layers."
        )
    names = [site.path for site in sites]
    modules = [site.module for site in sites]
    picks = np.unique(np.linspace(0, len(texts) - 1, num=min(segments, len(texts))).round().astype(int))
    per_segment = max(1, max_tokens // len(picks))
    runs = [tokenizer.encode(texts[i])[:per_segment] for i in picks]
    # The logits are not needed, only the routes: run the trunk when the model exposes one.
    trunk = getattr(model, "model", model)
    starts, offset = [], 0
    with recording_routes(modules) as records:
        for run in runs:
            if not run:
                continue
            starts.append(offset)
            offset += len(run)
            cache = make_prompt_cache(model)
            for i in range(0, len(run), chunk_tokens):
                out = trunk(mx.array(run[i:i + chunk_tokens])[None], cache=cache)
                mx.eval(out, [r[-1] for r in records])
    routes = []
    for record in records:
        arrays = [np.array(r).reshape(-1, r.shape[-1]) for r in record]
        routes.append(np.concatenate(arrays).astype(np.int64))
    return routes, names, [num_experts(m) for m in modules], starts


# --- what the routes say ----------------------------------------------------------------

def expert_histogram(routes: np.ndarray, n_experts: int) -> np.ndarray:
    """How many times each expert was routed to (sums to tokens x top_k)."""
    return np.bincount(routes.reshape(-1), minlength=n_experts)


def consecutive_overlap(routes: np.ndarray, segment_starts: Sequence[int] = (0,)) -> np.ndarray:
    """Per token t (not a segment start): the fraction of t's experts that token t-1 also used."""
    k = routes.shape[1]
    same = (routes[1:, :, None] == routes[:-1, None, :]).any(axis=2).sum(axis=1) / k
    keep = np.ones(len(same), dtype=bool)
    for start in segment_starts:
        if 0 < start <= len(same):
            keep[start - 1] = False  # pair (start - 1, start) crosses a segment boundary
    return same[keep]


def simulate_policy(routes: np.ndarray, capacity: int, policy, layer: int = 0) -> float:
    """Hit rate of a cache holding ``capacity`` experts, evicting what ``policy`` chooses.

    Every routed (token, expert) is one access; the current token's experts are not evictable,
    so ``capacity`` must be at least top_k. Keys are ``(layer, expert)``. Cold misses count.
    """
    if capacity < routes.shape[1]:
        raise RoutingReportError(f"cache capacity {capacity} is below top_k {routes.shape[1]}")
    cached: set[tuple[int, int]] = set()
    hits = 0
    for row in routes.tolist():
        needed = {(layer, e) for e in row}
        for key in ((layer, e) for e in row):
            if key in cached:
                hits += 1
            else:
                if len(cached) >= capacity:
                    victim = policy.choose_victim(cached - needed)
                    cached.discard(victim)
                    policy.evicted(victim)
                cached.add(key)
            policy.accessed(key)
    return hits / routes.size


def next_uses(routes: np.ndarray, n_experts: int) -> np.ndarray:
    """[tokens + 1, n_experts]: the first token at or after t that uses each expert (tokens: never)."""
    n = len(routes)
    used = np.zeros((n + 1, n_experts), dtype=bool)
    np.put_along_axis(used[:n], routes, True, axis=1)
    when = np.where(used, np.arange(n + 1)[:, None], n)
    return np.minimum.accumulate(when[::-1], axis=0)[::-1]


def simulate_belady(routes: np.ndarray, capacity: int, n_experts: int,
                    next_use: np.ndarray | None = None) -> float:
    """Belady's optimum under the same rules: evict the expert whose next use is farthest away."""
    if capacity < routes.shape[1]:
        raise RoutingReportError(f"cache capacity {capacity} is below top_k {routes.shape[1]}")
    if next_use is None:
        next_use = next_uses(routes, n_experts)
    cached: set[int] = set()
    hits = 0
    for t, row in enumerate(routes.tolist()):
        needed = set(row)
        for e in row:
            if e in cached:
                hits += 1
                continue
            if len(cached) >= capacity:
                candidates = list(cached - needed)
                victim = candidates[int(np.argmax(next_use[t + 1, candidates]))]
                cached.discard(victim)
            cached.add(e)
    return hits / routes.size


def default_policies() -> list[str]:
    """Every registered cache policy that can be built without options (the report's default)."""
    from outlier_runtime.core.plugin_manager import get_registry

    registry = get_registry()
    names = []
    for name in registry.names("cache_policy"):
        try:
            registry.create("cache_policy", name)
        except OutlierError:
            continue  # it needs options: nothing to simulate without choosing them
        names.append(name)
    return names


def capacity_for(fraction: float, n_experts: int, top_k: int) -> int:
    """Experts a cache of ``fraction`` holds: at least the top_k a single token needs."""
    return min(n_experts, max(top_k, int(round(fraction * n_experts))))


# --- the report -------------------------------------------------------------------------

def routing_report(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    max_tokens: int = 1024,
    policies: Sequence[str] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    texts: Sequence[str] | None = None,
    plots: bool = True,
) -> dict:
    """Route held-out text through the model at ``model_path``; write routing.json (and PNGs) to ``out_dir``.

    ``policies``: the cache-policy plugins to simulate (default: every registered one that builds
    without options), each beside Belady's optimum.
    """
    from mlx_lm import load

    if plots:
        _require_matplotlib()  # before minutes of routing, not after

    from outlier_runtime.core.plugin_manager import get_registry

    started = time.perf_counter()
    model_path, out_dir = Path(model_path), Path(out_dir)
    registry = get_registry()
    policies = list(policies) if policies is not None else default_policies()
    factories: dict[str, Callable[[], object]] = {
        name: (lambda name=name: registry.create("cache_policy", name)) for name in policies
    }
    model, tokenizer = load(str(model_path))
    texts = list(texts) if texts is not None else held_out_texts(model_path)
    routes, names, expert_counts, starts = collect_routes(model, tokenizer, texts, max_tokens=max_tokens)

    layers = []
    for index, (name, layer_routes, n_experts) in enumerate(zip(names, routes, expert_counts)):
        top_k = layer_routes.shape[1]
        capacities = [capacity_for(f, n_experts, top_k) for f in fractions]
        hit_rate = {policy: [simulate_policy(layer_routes, c, factory(), index) for c in capacities]
                    for policy, factory in factories.items()}
        upcoming = next_uses(layer_routes, n_experts)
        hit_rate["belady"] = [simulate_belady(layer_routes, c, n_experts, upcoming) for c in capacities]
        overlap = consecutive_overlap(layer_routes, starts)
        histogram = expert_histogram(layer_routes, n_experts)
        layers.append({
            "layer": index,
            "module": name,
            "num_experts": n_experts,
            "top_k": top_k,
            "tokens": int(len(layer_routes)),
            "histogram": histogram.tolist(),
            "experts_unused": int((histogram == 0).sum()),
            "mean_consecutive_overlap": float(overlap.mean()) if len(overlap) else 0.0,
            "capacities": capacities,
            "hit_rate": hit_rate,
        })

    n_experts, top_k = layers[0]["num_experts"], layers[0]["top_k"]
    summary_policies = list(policies) + ["belady"]
    report = {
        "provenance": {**provenance("outlier routing " + str(model_path)),
                       "seconds": round(time.perf_counter() - started, 2),
                       "config": {"max_tokens": max_tokens, "policies": list(policies),
                                  "fractions": list(fractions)}},
        "model_path": str(model_path),
        "tokens": layers[0]["tokens"],
        "segments": len(starts),
        "moe_layers": len(layers),
        "num_experts": n_experts,
        "top_k": top_k,
        "fractions": list(fractions),
        "summary": {
            "hit_rate": {p: [float(np.mean([layer["hit_rate"][p][i] for layer in layers]))
                             for i in range(len(fractions))] for p in summary_policies},
            "mean_consecutive_overlap": float(np.mean([layer["mean_consecutive_overlap"] for layer in layers])),
            # What the overlap would be if each token drew its top_k experts uniformly at random.
            "random_routing_overlap": top_k / n_experts,
        },
        "layers": layers,
        "notes": "hit rate = hits / routed (token, expert) accesses, cold misses included; per-layer caches "
                 "of capacity max(top_k, round(fraction x num_experts)); a token's own experts are never evicted",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "routing.json").write_text(json.dumps(report, indent=2))
    if plots:
        report["plots"] = write_plots(report, out_dir)
        (out_dir / "routing.json").write_text(json.dumps(report, indent=2))
    return report


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OutlierError("the routing report draws its plots with matplotlib, which is not installed: "
                           "pip install 'outlier-runtime[plots]', or pass --no-plots") from None


def write_plots(report: dict, out_dir: Path) -> list[str]:
    """hit_rate.png, expert_usage.png and overlap.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The capacities actually simulated (small fractions are clamped up to top_k).
    first = report["layers"][0]
    cached = [100 * c / first["num_experts"] for c in first["capacities"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, rates in report["summary"]["hit_rate"].items():
        ax.plot(cached, [100 * r for r in rates], marker="o",
                linestyle="--" if policy == "belady" else "-", label=policy)
    ax.set(xlabel="experts cached per layer (%)", ylabel="hit rate (%)",
           title=f"Expert cache hit rate ({report['tokens']} tokens, mean of {report['moe_layers']} layers)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "hit_rate.png", dpi=100)
    plt.close(fig)

    usage = np.array([layer["histogram"] for layer in report["layers"]], dtype=float)
    usage /= usage.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(8, 3))
    image = ax.imshow(usage, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="MoE layer", title="Share of routed accesses per expert")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out_dir / "expert_usage.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    overlaps = [layer["mean_consecutive_overlap"] for layer in report["layers"]]
    ax.bar(range(len(overlaps)), overlaps, label="measured")
    ax.axhline(report["summary"]["random_routing_overlap"], color="gray", linestyle="--", label="random routing")
    ax.set(xlabel="MoE layer", ylabel="overlap", ylim=(0, 1),
           title="Share of a token's experts the previous token also used")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "overlap.png", dpi=100)
    plt.close(fig)
    return ["hit_rate.png", "expert_usage.png", "overlap.png"]
