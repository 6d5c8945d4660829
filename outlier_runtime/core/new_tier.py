"""``outlier new-tier``: write a user manifest to start from."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from outlier_runtime.core.errors import ManifestError, TierNotFoundError
from outlier_runtime.core.catalog import deep_merge, discover, outlier_home

HEADER = """\
# A user tier manifest written by `outlier new-tier`. Edit any knob; unknown keys are errors.
# The JSON Schema for editors: `outlier schema > ~/.config/outlier/tier.schema.json`.
"""


def write_new_tier(name: str, base: str, directory: Path | None = None) -> Path:
    """Copy tier ``base``'s merged manifest under the new id ``name``; refuse to overwrite."""
    sources = discover()
    if base not in sources:
        raise TierNotFoundError(f"No tier named {base!r} to start from. Known: {', '.join(sorted(sources))}.")
    data = deep_merge(sources[base].data, {"tier": {"id": name, "display_name": name.capitalize()}})
    directory = directory or outlier_home() / "tiers"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    if path.exists():
        raise ManifestError(f"{path} already exists; edit it, or choose another name.")
    path.write_text(HEADER + tomli_w.dumps(data))
    return path
