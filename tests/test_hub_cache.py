"""`outlier pull`, `outlier rm` and the downloaded column of `outlier tiers`, on a fake Hugging
Face cache (the conftest points HF_HUB_CACHE at a temporary directory; no network)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from outlier_runtime.cli import main
from outlier_runtime.core.hub_cache import hub_cache_dir

NANO_REPO = "mlx-community/Qwen3.5-4B-4bit"
OTHER_REPO = "someone/other-model"


def outlier(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def fake_snapshot(repo: str, files: dict[str, bytes]) -> Path:
    """A repo laid out as huggingface_hub caches it: blobs by hash, a snapshot of symlinks, a ref."""
    commit = hashlib.sha1(repo.encode()).hexdigest()  # commit hashes are unique across repos
    repo_dir = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


MODEL_FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 4096}


def rows() -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(outlier("tiers", "--json").stdout)}


def test_tiers_shows_what_is_downloaded_and_its_size():
    assert rows()["nano"]["downloaded"] is False and rows()["nano"]["disk_bytes"] == 0
    fake_snapshot(NANO_REPO, MODEL_FILES)
    nano = rows()["nano"]
    assert nano["downloaded"] is True
    assert nano["disk_bytes"] == sum(len(data) for data in MODEL_FILES.values())
    assert rows()["lite"]["downloaded"] is False
    line = next(line for line in outlier("tiers").stdout.splitlines() if line.startswith("nano"))
    assert "downloaded: yes (0.0 MB)" in line


def test_a_partial_download_is_not_downloaded():
    fake_snapshot(NANO_REPO, {"model.safetensors": b"\0" * 10})  # no config.json yet
    assert rows()["nano"]["downloaded"] is False and rows()["nano"]["disk_bytes"] == 10


@pytest.fixture
def fake_hub(monkeypatch):
    """snapshot_download replaced by one that 'downloads' MODEL_FILES; records its calls."""
    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, cache_dir=None, **kwargs):
        calls.append({"repo": repo_id, "revision": revision, "patterns": allow_patterns, "cache_dir": cache_dir})
        return str(fake_snapshot(repo_id, MODEL_FILES))

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls


def test_pull_downloads_the_tiers_repo_into_the_hf_cache(fake_hub):
    result = outlier("pull", "nano")
    assert result.exit_code == 0, result.output
    assert [call["repo"] for call in fake_hub] == [NANO_REPO]
    assert "*.safetensors" in fake_hub[0]["patterns"] and Path(fake_hub[0]["cache_dir"]) == hub_cache_dir()
    assert result.stdout.startswith(f"nano: {NANO_REPO} is downloaded (")
    assert rows()["nano"]["downloaded"] is True


def test_pull_takes_a_repo_id_too(fake_hub):
    assert outlier("pull", OTHER_REPO).exit_code == 0
    assert fake_hub[0]["repo"] == OTHER_REPO


def test_pull_checks_free_disk_against_the_tier_first(fake_hub, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**9, 10**9))
    result = outlier("pull", "nano")  # nano's disk_gb is 2.37
    assert result.exit_code == 2 and fake_hub == []
    assert result.stderr.startswith(f"error: outlier pull nano: {NANO_REPO} needs 2.4 GB more (disk_gb 2.37) but ")
    assert "1.0 GB free" in result.stderr and len(result.stderr.splitlines()) == 1


def test_pull_offline_is_one_line(monkeypatch):
    result = outlier("pull", "nano")  # the conftest sets HF_HUB_OFFLINE
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "could not download 'mlx-community/Qwen3.5-4B-4bit'" in result.stderr


def test_running_a_tier_that_is_not_downloaded_names_outlier_pull():
    result = outlier("run", "nano", "hi", "--force")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "Run `outlier pull nano` when online" in result.stderr


def test_rm_deletes_only_that_repo():
    nano = fake_snapshot(NANO_REPO, MODEL_FILES)
    other = fake_snapshot(OTHER_REPO, {**MODEL_FILES, "extra.json": b"{}"})
    result = outlier("rm", "nano")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"nano: removed {NANO_REPO} from {hub_cache_dir()}, freed")
    assert not nano.parent.parent.exists()
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "extra.json", "model.safetensors"]
    assert (other / "model.safetensors").read_bytes() == MODEL_FILES["model.safetensors"]
    again = outlier("rm", "nano")
    assert again.exit_code == 0 and "is not downloaded; nothing to remove" in again.stdout


def test_pull_refuses_a_tier_with_a_local_model(isolated_home):
    (isolated_home / "tiers").mkdir(parents=True)
    (isolated_home / "tiers" / "nano.toml").write_text('[model]\npath = "/models/nano"\n')
    result = outlier("pull", "nano")
    assert result.exit_code == 2 and "reads a local model (/models/nano)" in result.stderr


def test_a_tier_on_a_local_directory_is_downloaded_when_its_config_is_there(isolated_home, tiny):
    (isolated_home / "tiers").mkdir(parents=True)
    (isolated_home / "tiers" / "nano.toml").write_text(f'[model]\npath = "{tiny("llama")}"\n')
    (isolated_home / "tiers" / "lite.toml").write_text('[model]\npath = "/nonexistent/lite"\n')
    (isolated_home / "tiers" / "code.toml").write_text('[model]\npath = "embedded:nosuch"\n')
    listed = rows()
    size = sum(f.stat().st_size for f in Path(tiny("llama")).rglob("*") if f.is_file())
    assert listed["nano"]["downloaded"] is True and listed["nano"]["disk_bytes"] == size
    assert listed["lite"]["downloaded"] is False and listed["code"]["downloaded"] is False
