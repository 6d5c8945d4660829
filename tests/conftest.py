"""Shared fixtures: an isolated outlier home, and tiny models built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from outlier_runtime.core import plugin_manager


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny(tiny_cache: Path):
    """``tiny(arch, **kwargs)`` -> path of a tiny model, built once per session."""
    from outlier_runtime.testing.tiny_models import tiny_model

    def build(arch: str, **kwargs) -> Path:
        return tiny_model(arch, cache_dir=tiny_cache, **kwargs)

    return build


@pytest.fixture(scope="session")
def tiny_vlm_dir(tiny_cache: Path) -> Path:
    """A tiny qwen3_5_moe vision-language model (mlx-vlm layout), built once per session."""
    from outlier_runtime.testing.tiny_vlm import tiny_vlm

    return tiny_vlm(cache_dir=tiny_cache)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the developer's ~/.config/outlier."""
    home = tmp_path / "outlier-home"
    monkeypatch.setenv("OUTLIER_HOME", str(home))
    monkeypatch.delenv("OUTLIER_TIERS_PATH", raising=False)
    monkeypatch.delenv("OUTLIER_MMAP_EXPERTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its settings at import time (during collection): patch them too,
    # so no test can touch the network or the developer's Hugging Face cache.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield home
    plugin_manager.clear_registered_plugins()


@pytest.fixture(scope="module")
def nano(tiny, tmp_path_factory):
    """The Nano tier on a tiny dense llama, loaded once per test module."""
    import outlier_runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTLIER_HOME", str(tmp_path_factory.mktemp("outlier-home")))
        runtime = outlier_runtime.load("nano", model=str(tiny("llama")), force=True)
    yield runtime
    runtime.close()
