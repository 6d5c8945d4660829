"""Finding a model's weights: a local directory, or a Hugging Face repo id (downloaded with progress)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from outlier_runtime.embedded import SCHEME, embedded_model
from outlier_runtime.core.errors import ModelNotFoundError
from outlier_runtime.core.manifest import ModelSection
from outlier_runtime.core.model_files import check_model_dir

log = logging.getLogger(__name__)

# What a model directory needs; everything else in a repo (READMEs, images) is skipped.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


def resolve_model(source: ModelSection, tier: str) -> Path:
    """The local directory holding the model's weights, downloading them if needed and possible.

    Its config.json and tokenizer files are checked here, so that every loader gets a model
    directory whose small files are sound (see :func:`check_model_dir`).
    """
    path = _locate(source, tier)
    check_model_dir(path)
    return path


def _locate(source: ModelSection, tier: str) -> Path:
    if source.path and source.path.startswith(SCHEME):
        return embedded_model(source.path)
    if source.path:
        path = Path(source.path).expanduser()
        if not os.path.lexists(path / "config.json"):
            raise ModelNotFoundError(
                f"Tier {tier!r}: model path {path} has no config.json. Point `model.path` at an "
                f"mlx-lm model directory (config.json, *.safetensors, tokenizer files)."
            )
        return path
    assert source.repo is not None  # the schema guarantees repo or path
    return _from_hub(source.repo, source.revision, tier)


def _from_hub(repo: str, revision: str | None, tier: str) -> Path:
    # Imported here: huggingface_hub is only needed when a tier names a repo.
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    try:
        # Already in the Hugging Face cache (HF_HOME): no network needed.
        return Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILE_PATTERNS,
                                      local_files_only=True))
    except Exception:
        pass
    try:
        log.info("downloading %s (revision %s)", repo, revision or "main")
        # snapshot_download resumes partial files and shows a tqdm progress bar per file.
        return Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"Tier {tier!r}: model {repo!r} is not in the Hugging Face cache and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). When online, run "
            f"`huggingface-cli download {repo}`; or put an mlx-lm model directory on disk and set "
            f"`[model] path` in a user manifest (see `outlier new-tier`) or pass model=PATH."
        ) from exc
    except Exception as exc:  # offline mode and connection errors have many types
        raise ModelNotFoundError(
            f"Tier {tier!r}: model {repo!r} is not available offline ({type(exc).__name__}: {exc}). "
            f"Download it when online (`huggingface-cli download {repo}`), or set `[model] path` "
            f"to a local mlx-lm model directory, or pass model=PATH."
        ) from exc
