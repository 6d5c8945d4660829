"""``outlier verify``: check on this machine that the paged engine is bit-identical to stock mlx-lm.

It loads a small MoE resident (stock ``mlx_lm.load``) and paged at several slot counts on
mlx's default device, runs prompts whose lengths sit on both sides of every threshold of
mlx's kernel choice (outlier_runtime/engine/kernels.py), and compares logits bit for bit and
greedy tokens. The rule it checks: each paged call runs the kernel the resident call runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from outlier_runtime.core.errors import ModelNotFoundError, OutlierError

DEMO_MODEL = "embedded:demo-moe"
#: Text the prompts are cut from (repeated as needed): any text works, code is the demo's domain.
PROMPT_TEXT = "import os\n\ndef walk(path):\n    for name in sorted(os.listdir(path)):\n        yield name\n"
#: mlx-lm sorts a switch call's pairs from this many on (models/switch_layers.py).
SORT_PAIRS = 64
NEW_TOKENS = 8
#: Reaches the demo's NAX wide-tile threshold (64 x 64 experts / top-4 = 1024 tokens).
LONGEST_PROMPT = 1100


@dataclass
class Check:
    """One comparison of the paged engine with the resident model."""

    slots: int
    kind: str  # "logits" or "greedy"
    prompt_tokens: int
    pairs: int
    resident_kernel: str
    #: Kernels the paged layers ran and how many calls (passes) that took, over all layers.
    paged_kernels: list[str]
    paged_calls: int
    identical: bool
    max_abs_diff: float | None = None

    @property
    def same_kernel(self) -> bool | None:
        """Whether every paged call ran the resident kernel (None: not recorded, e.g. greedy)."""
        return self.paged_kernels == [self.resident_kernel] if self.paged_kernels else None


@dataclass
class VerifyReport:
    """Every check of one ``verify`` run, and what it ran on."""

    model: str
    device: str
    mlx_version: str
    experts: int
    top_k: int
    slot_counts: list[int]
    checks: list[Check] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Every check identical, and no paged call ran another kernel than the resident one."""
        return bool(self.checks) and all(c.identical and c.same_kernel is not False for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, check in zip(data["checks"], self.checks):
            row["same_kernel"] = check.same_kernel
        return {**data, "identical": self.identical}

    def table(self) -> str:
        header = (f"{'slots':>5} {'check':<6} {'tokens':>6} {'pairs':>6}  {'resident kernel':<24} "
                  f"{'paged calls':>11} {'kernel':>7}  result")
        lines = [header, "-" * len(header)]
        for c in self.checks:
            result = "identical" if c.identical else f"DIFFERENT (max |diff| {c.max_abs_diff})"
            kernel = {True: "same", False: "OTHER", None: "-"}[c.same_kernel]
            lines.append(f"{c.slots:>5} {c.kind:<6} {c.prompt_tokens:>6} {c.pairs:>6}  "
                         f"{c.resident_kernel:<24} {c.paged_calls:>11} {kernel:>7}  {result}")
        return "\n".join(lines)

    def verdict(self) -> str:
        if self.identical:
            return (f"IDENTICAL: the paged engine matched stock mlx-lm bit for bit in all "
                    f"{len(self.checks)} checks on {self.device} (mlx {self.mlx_version}).")
        bad = sum(not c.identical or c.same_kernel is False for c in self.checks)
        return (f"DIFFERENT: {bad} of {len(self.checks)} checks differ on {self.device} "
                f"(mlx {self.mlx_version}); please report this with `outlier verify --json`.")


def threshold_prompt_lengths(experts: int, top_k: int, slot_counts: list[int], longest: int) -> list[int]:
    """Prompt lengths (tokens) just below and at every row count where a kernel choice flips.

    Pairs = tokens x top_k. The flips: mlx-lm sorts at 64 pairs; Metal's rhs kernel at
    4 x E pairs (E = experts resident, slots paged) and its NAX 64-row tile at 64 x E.
    """
    thresholds = {SORT_PAIRS, 4 * experts, 64 * experts}
    for slots in slot_counts:
        thresholds.update((4 * slots, 64 * slots))
    lengths = {1}
    for pairs in thresholds:
        at = math.ceil(pairs / top_k)
        lengths.update(n for n in (at - 1, at) if 1 <= n <= longest)
    return sorted(lengths)


def default_slot_counts(experts: int, top_k: int) -> list[int]:
    """1, top-k, half and all of the experts."""
    return sorted({1, min(top_k, experts), max(1, experts // 2), experts})


def _resolve(model: str) -> Path:
    from outlier_runtime.embedded import SCHEME, embedded_model

    if model.startswith(SCHEME):
        return embedded_model(model)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path}: not a model directory (no config.json); pass --model an mlx-lm MoE "
            f"directory small enough to load whole, or omit it to check {DEMO_MODEL}"
        )
    return path


def _prompt(tokenizer: Any, length: int) -> list[int]:
    ids = list(tokenizer.encode(PROMPT_TEXT))
    return (ids * (length // len(ids) + 1))[:length]


def _geometry(model: Any, path: Path) -> tuple[int, int, bool]:
    """(experts, top_k, quantized) of the model's first MoE layer."""
    from mlx.utils import tree_flatten

    from outlier_runtime.engine.experts import TOP_K_ATTRIBUTES, find_switch_modules

    sites = find_switch_modules(model)
    if not sites:
        raise OutlierError(f"{path}: no MoE expert layers found; `outlier verify` checks MoE models only")
    params = dict(tree_flatten(sites[0].module.parameters()))
    experts = next(v.shape[0] for k, v in params.items() if k.endswith("weight"))
    top_k = next((getattr(sites[0].block, n) for n in TOP_K_ATTRIBUTES
                  if isinstance(getattr(sites[0].block, n, None), int)), None)
    if top_k is None:
        raise OutlierError(f"{path}: cannot find the router's experts-per-token on {type(sites[0].block).__name__}")
    return experts, top_k, any(k.endswith("scales") for k in params)


def _paged_plans(model: Any) -> list[Any]:
    # Read by duck typing: the core never imports a plugin (the paged switch records its plan).
    return [m.last_plan for _, m in model.named_modules() if getattr(m, "last_plan", None) is not None]


def _greedy(model: Any, tokenizer: Any, prompt: list[int], count: int) -> list[int]:
    import mlx.core as mx
    import mlx_lm

    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, mx.array(prompt), max_tokens=count)]


def verify(model: str | None = None, slot_counts: list[int] | None = None, longest_prompt: int = LONGEST_PROMPT,
           new_tokens: int = NEW_TOKENS, echo: Callable[[str], None] | None = None) -> VerifyReport:
    """Compare the paged engine with stock mlx-lm on the default device; see :class:`VerifyReport`.

    ``model``: an mlx-lm MoE directory small enough to load whole (default: the embedded demo).
    ``slot_counts``: default 1, top-k, half and all experts. ``longest_prompt`` caps the prompt
    lengths (tokens) chosen at the thresholds.
    """
    import mlx.core as mx
    import mlx_lm

    import outlier_runtime
    from outlier_runtime.engine.kernels import device_rule, engine_call, kernel_for

    if any(s < 1 for s in slot_counts or ()) or longest_prompt < 1 or new_tokens < 1:
        raise OutlierError(
            f"slots {slot_counts}, longest prompt {longest_prompt}, new tokens {new_tokens}: "
            f"each must be at least 1"
        )
    reference = model or DEMO_MODEL
    path = _resolve(reference)
    try:
        resident, tokenizer = mlx_lm.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's model, named in one line
        reason = " ".join(str(exc).split())
        raise ModelNotFoundError(f"{path}: mlx-lm cannot load this model ({type(exc).__name__}: {reason})") from exc
    experts, top_k, quantized = _geometry(resident, path)
    counts = sorted(set(slot_counts or default_slot_counts(experts, top_k)))
    counts = [min(s, experts) for s in counts]
    backend, nax = device_rule()
    report = VerifyReport(reference, str(mx.default_device()), mx.__version__, experts, top_k, counts)
    lengths = threshold_prompt_lengths(experts, top_k, counts, longest_prompt)
    prompts = {n: _prompt(tokenizer, n) for n in lengths}
    expected = {}
    for n, ids in prompts.items():
        expected[n] = resident(mx.array(ids)[None])
        mx.eval(expected[n])
    # Greedy decoding after a prompt at Metal's rhs threshold: a sorted prefill, then decode steps.
    rhs_at = min(math.ceil(4 * experts / top_k), longest_prompt)
    greedy_prompt = prompts[max(n for n in lengths if n <= rhs_at)]
    greedy_expected = _greedy(resident, tokenizer, greedy_prompt, new_tokens)
    # Room for every slot and one read buffer per slot (twice the checkpoint bounds both).
    cache_gb = 2 * sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
    for requested in counts:
        runtime = outlier_runtime.load("plus", model=str(path), k_override=requested, cache_gb=cache_gb, force=True)
        try:
            slots = runtime.engine_stats()["config"]["slots_per_layer"]  # what really ran
            for n, ids in prompts.items():
                got = runtime.model(mx.array(ids)[None])
                same = mx.array_equal(got, expected[n]).item()
                plans = _paged_plans(runtime.model)
                check = Check(
                    slots, "logits", n, n * top_k,
                    kernel_for(engine_call(n * top_k, experts, quantized, nax), backend),
                    sorted({kernel for plan in plans for _, _, kernel in plan.passes}),
                    sum(len(plan.passes) for plan in plans), same,
                    None if same else mx.max(mx.abs(got - expected[n])).item(),
                )
                report.checks.append(check)
                if echo:
                    echo(f"slots {slots}, {n} tokens: {'identical' if same else 'DIFFERENT'}")
            tokens = _greedy(runtime.model, runtime.tokenizer, greedy_prompt, new_tokens)
            report.checks.append(Check(
                slots, "greedy", len(greedy_prompt), len(greedy_prompt) * top_k,
                kernel_for(engine_call(len(greedy_prompt) * top_k, experts, quantized, nax), backend),
                [], 0, tokens == greedy_expected,
            ))
        finally:
            runtime.close()
    return report
