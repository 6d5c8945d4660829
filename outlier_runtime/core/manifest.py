"""The tier manifest schema (pydantic v2) and the TOML parsing that reports errors usefully.

Every validation error names the manifest file, the TOML key path and what was expected.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

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
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The loader's options, checked against the options it declares (`outlier plugins --options`).",
    )


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


class TierManifest(BaseModel):
    """One tier: identity, model source, loader and generation defaults.

    A loader may read its options from a top-level table of its own (the paged loader reads
    ``[paging]``); any other unknown table or key is an error, reported by the catalog once it
    knows the tier's loader. The loader's validated options are ``loader_options``.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    tier: TierSection
    model: ModelSection
    loader: LoaderSection
    generation: GenerationSection = Field(default_factory=GenerationSection)
    _loader_options: Optional[BaseModel] = PrivateAttr(default=None)

    @property
    def name(self) -> str:
        return self.tier.id

    @property
    def plugin_tables(self) -> dict[str, Any]:
        """Top-level tables beyond the core sections (a loader's own table, e.g. ``paging``)."""
        return dict(self.model_extra or {})

    @property
    def loader_options(self) -> BaseModel:
        """The loader's options, validated against its plugin's model when the tier was resolved."""
        if self._loader_options is None:
            raise ManifestError(f"tier {self.name!r}: options not resolved; load tiers with outlier_runtime.load()")
        return self._loader_options

    def to_data(self) -> dict[str, Any]:
        """The manifest as TOML-shaped data, with the loader's options complete (defaults filled in)."""
        data = self.model_dump(exclude_none=True)
        if self._loader_options is not None:
            table = next(iter(self.plugin_tables), None)
            resolved = self._loader_options.model_dump(exclude_none=True)
            if table is not None:
                data[table] = resolved
            else:
                data["loader"]["options"] = resolved
        return data


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
    """One line for one problem; a header and one line per problem for several."""
    problems = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"]]
        key = ".".join(location) or "(top level)"
        problems.append(f"key `{key}`: {explain_error(error)}")
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return "\n".join([f"{source}: invalid tier manifest ({len(problems)} problems):",
                      *(f"  - {problem}" for problem in problems)])


def explain_error(error: dict[str, Any]) -> str:
    """What one pydantic error means, in words a manifest author can act on."""
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
    if kind == "value_error":  # our own validators' words, without pydantic's "Value error, " prefix
        return f"got {given!r}: {error['ctx']['error'] if 'error' in ctx else error['msg']}"
    return f"got {given!r}: {error['msg']}"
