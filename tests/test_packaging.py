"""A wheel (not only an editable install) carries the manifests, every built-in plugin and its entry point."""

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


def test_wheel_ships_every_builtin_plugin_with_its_entry_point(wheel):
    names = set(wheel.namelist())
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = wheel.read(entry_points).decode()
    for package in sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists()):
        assert f"{package}/__init__.py" in names
        assert f"= {package}" in text
    assert "outlier = outlier_runtime.cli:main" in text
    assert "outlier_runtime/py.typed" in names


def test_wheel_ships_the_embedded_demo_model(wheel):
    names = set(wheel.namelist())
    for file in (ROOT / "outlier_runtime" / "embedded" / "demo-moe").iterdir():
        assert f"outlier_runtime/embedded/demo-moe/{file.name}" in names
    assert "outlier_runtime/embedded/__init__.py" in names
