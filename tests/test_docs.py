"""The docs match the code: every public name and every manifest key is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

import outlier_runtime
from outlier_runtime.core.manifest import TierManifest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("name", outlier_runtime.__all__)
def test_public_name_is_documented(name):
    assert f"`{name}" in (DOCS / "api.md").read_text()


def _manifest_keys():
    for section, field in TierManifest.model_fields.items():
        model = field.annotation
        model = next((a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model)
        for key in model.model_fields:
            yield section, key


@pytest.mark.parametrize("section, key", list(_manifest_keys()))
def test_manifest_key_is_documented(section, key):
    text = (DOCS / "manifest.md").read_text()
    table = text[text.index(f"## `[{section}]`"):]
    assert f"| `{key}` |" in table.split("\n## ")[0]


@pytest.mark.parametrize("usage", ["outlier pull nano", "outlier chat nano", "outlier run nano -", "outlier rm nano",
                                   "outlier --version", "_OUTLIER_COMPLETE=bash_source outlier"])
def test_readme_shows_the_everyday_commands(usage):
    readme = (DOCS.parent / "README.md").read_text()
    assert usage in readme
