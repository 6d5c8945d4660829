"""The docs match the code: every public name and manifest key is documented, every key is read,
and every relative link leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import outlier_runtime
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.plugin_manager import get_registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.parametrize("name", outlier_runtime.__all__)
def test_public_name_is_documented(name):
    assert f"`{name}" in (DOCS / "api.md").read_text()


def _manifest_keys():
    for section, field in TierManifest.model_fields.items():
        model = field.annotation
        model = next((a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model)
        for key in model.model_fields:
            yield section, key
    # A loader's own table (the paged loader's [paging]) is part of the manifest too.
    for loader in get_registry().all("loader"):
        if loader.manifest_table:
            for key in loader.options.model_fields:
                yield loader.manifest_table, key


def _plugin_option_keys():
    for kind in get_registry().kinds():
        for registration in get_registry().all(kind):
            if registration.distribution == "outlier-runtime":
                for key in registration.options.model_fields:
                    yield f"{kind}:{registration.name}", key


def _code() -> str:
    sources = [*(ROOT / "outlier_runtime").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    return "\n".join(path.read_text() for path in sources)


@pytest.mark.parametrize("section, key", list(_manifest_keys()) + list(_plugin_option_keys()))
def test_every_schema_key_is_read_by_code(section, key):
    """A key nothing reads is a knob that silently does nothing: read it or remove it."""
    # Reading means attribute access on a validated model, getattr or .get with the name; an
    # assignment (``x.key = ...``) or the field's declaration (``key: type = ...``) does not count.
    reads = re.findall(rf"\.{key}\b(?!\s*=[^=])|(?:getattr\([^)]*|\.get\()[\"']{key}[\"']", _code())
    assert reads, f"[{section}] {key} is declared but never read"


def _relative_links(path: Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_leads_somewhere(page):
    for link in _relative_links(page):
        file, _, anchor = link.partition("#")
        target = (page.parent / file).resolve() if file else page
        assert target.exists(), f"{page.name}: link {link!r} leads nowhere"
        if anchor and target.suffix == ".md":
            slugs = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", target.read_text(), re.M)}
            assert anchor in slugs, f"{page.name}: anchor #{anchor} not in {target.name}"


@pytest.mark.parametrize("section, key", list(_manifest_keys()))
def test_manifest_key_is_documented(section, key):
    text = (DOCS / "manifest.md").read_text()
    table = text[text.index(f"## `[{section}]`"):]
    assert f"| `{key}` |" in table.split("\n## ")[0]


def test_architecture_lists_every_module():
    tree = (DOCS / "architecture.md").read_text().split("```")[1]
    modules = [*(ROOT / "outlier_runtime").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    for module in modules:
        if module.name == "__init__.py":
            # A package is listed by its folder name (a plugin package, or a group of modules).
            assert f"{module.parent.name}/" in tree, module.parent
        else:
            assert module.name in tree, module


@pytest.mark.parametrize("usage", ["outlier pull nano", "outlier chat nano", "outlier run nano -", "outlier rm nano",
                                   "outlier --version", "_OUTLIER_COMPLETE=bash_source outlier"])
def test_readme_shows_the_everyday_commands(usage):
    readme = (DOCS.parent / "README.md").read_text()
    assert usage in readme
