"""The tier manifest schema (pydantic v2) and the TOML parsing that reports errors usefully.

Every validation error names the manifest file, the TOML key path and what was expected.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from outlier_runtime.core.errors import ManifestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class _Section(BaseModel):
    # Unknown keys are mistakes (a misspelt knob must not be silently ignored).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TierSection(_Section):
    """Who the tier is."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Tier name used to select it.")
    display_name: str = Field(description="Name shown to people, e.g. 'Core'.")
    description: str = ""
    kind: Literal["dense", "small-moe", "large-moe"]
    min_ram_gb: float = Field(gt=0, description="Memory the tier needs; admission adds 15% slack.")
    disk_gb: float = Field(ge=0, description="Size of the weights on disk.")
    reference_tok_s: Optional[float] = Field(
        default=None, ge=0, description="The product's published decode speed (M1 Ultra 64 GB)."
    )


class ModelSection(_Section):
    """Where the weights come from: a local directory, or a Hugging Face repo id."""

    repo: Optional[str] = Field(default=None, description="Hugging Face repo id, e.g. 'org/name'.")
    path: Optional[str] = Field(default=None, description="Local model directory (wins over repo).")
    revision: Optional[str] = Field(default=None, description="Branch, tag or commit to pin.")
    image_input: bool = Field(default=False, description="The model accepts images.")

    @model_validator(mode="after")
    def _needs_a_source(self) -> "ModelSection":
        if not self.repo and not self.path:
            raise ValueError("set `repo` (a Hugging Face repo id) or `path` (a local directory)")
        return self


class LoaderSection(_Section):
    """Which loader plugin builds the model, and its options."""

    name: str = Field(description="A registered loader name (see `outlier plugins`).")
    options: dict[str, Any] = Field(default_factory=dict)


class GenerationSection(_Section):
    """Defaults for generation; each can be overridden per call."""

    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    context_window: int = Field(default=32768, ge=1)
    system_prompt: Optional[str] = None
    seed: Optional[int] = None
    use_chat_template: bool = Field(
        default=True, description="Wrap a plain-string prompt as a user message in the chat template."
    )


class PagingSection(_Section):
    """The paged-MoE engine's knobs (the product's, plus ours)."""

    k_override: int = Field(default=20, ge=1, description="Compute-ready expert slots per MoE layer.")
    cache_gb: float = Field(
        default=8.0, ge=0, description="Upper bound on all expert bytes held: slots plus RAM cache."
    )
    mmap_experts: bool = Field(
        default=False, description="Read experts through mmap (OUTLIER_MMAP_EXPERTS overrides)."
    )
    lazy_load: bool = Field(default=True, description="Never materialize stacked expert tensors.")
    reader: str = Field(default="pread", description="A registered reader name.")
    reader_options: dict[str, Any] = Field(default_factory=dict)
    cache_policy: str = Field(default="lru", description="A registered cache-policy name.")
    prefetcher: Optional[str] = Field(default=None, description="A registered prefetcher, or none.")
    experts_per_token: Optional[int] = Field(
        default=None, ge=1, description="Override the router's top-k. Changes results."
    )
    use_pack: bool = Field(default=True, description="Use a packed expert layout when a valid one exists.")
    verify_checksums: bool = Field(default=False, description="Verify per-expert checksums on read.")


class TierManifest(_Section):
    """One tier: identity, model source, loader, generation defaults and (for MoE) paging."""

    tier: TierSection
    model: ModelSection
    loader: LoaderSection
    generation: GenerationSection = Field(default_factory=GenerationSection)
    paging: Optional[PagingSection] = None

    @property
    def name(self) -> str:
        return self.tier.id


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into a ManifestError naming the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}. Fix the syntax at that line.") from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc


def validate_manifest(data: dict[str, Any], source: str) -> TierManifest:
    """Validate merged manifest data; ``source`` names the file(s) it came from."""
    try:
        return TierManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid tier manifest ({exc.error_count()} problem(s)):"]
    for error in exc.errors():
        location = [str(part) for part in error["loc"]]
        key = ".".join(location) or "(top level)"
        lines.append(f"  - key `{key}`: {_explain(error)}")
    return "\n".join(lines)


def _explain(error: dict[str, Any]) -> str:
    kind = error["type"]
    given = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling (see `outlier schema`)"
    if kind == "missing":
        return "required key is missing; add it"
    bounds = {
        "greater_than_equal": f"expected a number >= {ctx.get('ge')}",
        "greater_than": f"expected a number > {ctx.get('gt')}",
        "less_than_equal": f"expected a number <= {ctx.get('le')}",
        "less_than": f"expected a number < {ctx.get('lt')}",
    }
    if kind in bounds:
        return f"got {given!r}, {bounds[kind]}"
    return f"got {given!r}: {error['msg']}"
