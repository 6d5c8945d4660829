"""``outlier new-tier``: write a user manifest to start from."""

from __future__ import annotations

import re
from pathlib import Path

import tomli_w

from outlier_runtime.core.errors import ManifestError, TierNotFoundError
from outlier_runtime.core.catalog import deep_merge, discover, outlier_home
from outlier_runtime.core.manifest import TierSection

def header() -> str:
    """The comment on top of a new manifest; it names this user's directory (``$OUTLIER_HOME``)."""
    return (
        "# A user tier manifest written by `outlier new-tier`. Edit any knob; unknown keys are errors.\n"
        f"# The JSON Schema for editors: `outlier schema > {outlier_home() / 'tier.schema.json'}`.\n"
    )


def write_new_tier(name: str, base: str, directory: Path | None = None) -> Path:
    """Copy tier ``base``'s merged manifest under the new id ``name``; refuse to overwrite."""
    check_tier_name(name)
    sources = discover()
    if base not in sources:
        raise TierNotFoundError(f"No tier named {base!r} to start from. Known: {', '.join(sorted(sources))}.")
    data = deep_merge(sources[base].data, {"tier": {"id": name, "display_name": name.capitalize()}})
    directory = directory or outlier_home() / "tiers"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    if path.exists():
        raise ManifestError(f"{path} already exists; edit it, or choose another name.")
    path.write_text(header() + tomli_w.dumps(data))
    return path


def tier_id_pattern() -> str:
    """The manifest's pattern for ``tier.id`` (read from the schema, so the two cannot disagree)."""
    for constraint in TierSection.model_fields["id"].metadata:
        pattern = getattr(constraint, "pattern", None)
        if pattern:
            return pattern
    return r"^[a-z0-9][a-z0-9_-]*$"


def check_tier_name(name: str) -> None:
    """Refuse a name the manifest's ``tier.id`` would refuse, before a file is written."""
    pattern = tier_id_pattern()
    if not re.fullmatch(pattern, name):
        raise ManifestError(
            f"Tier name {name!r} is not a valid `tier.id` (pattern {pattern}): use lowercase letters, "
            f"digits, '-' and '_', starting with a letter or digit, e.g. {_suggest(name)!r}."
        )


def _suggest(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_") or "mine"
