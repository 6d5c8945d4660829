"""A wheel (not only an editable install) carries the manifests, every package and every built-in plugin."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("outlier_runtime-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_ships_the_builtin_manifests(wheel):
    names = set(wheel.namelist())
    for manifest in (ROOT / "tiers").glob("*.toml"):
        assert f"outlier_runtime/builtin_tiers/{manifest.name}" in names


def test_wheel_ships_every_builtin_plugin_and_every_core_package(wheel):
    from outlier_runtime.core.plugin_manager import DEFAULT_PLUGINS

    names = set(wheel.namelist())
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = wheel.read(entry_points).decode()
    plugins = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())
    # Every plugin folder is a registered built-in, and ships as a module of its own.
    assert sorted(DEFAULT_PLUGINS.values()) == plugins
    for package in plugins:
        assert f"{package}/__init__.py" in names
    for init in (ROOT / "outlier_runtime").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names
    assert "outlier = outlier_runtime.cli:main" in text
    assert "outlier_runtime/py.typed" in names


def test_wheel_ships_the_embedded_demo_model(wheel):
    names = set(wheel.namelist())
    for file in (ROOT / "outlier_runtime" / "embedded" / "demo-moe").iterdir():
        assert f"outlier_runtime/embedded/demo-moe/{file.name}" in names
    assert "outlier_runtime/embedded/__init__.py" in names
