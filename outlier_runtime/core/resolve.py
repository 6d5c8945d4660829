"""Finding a model's weights: an embedded model, a local directory, or a Hugging Face repo id."""

from __future__ import annotations

import logging
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
        return model_directory(Path(source.path), f"Tier {tier!r}: model path")
    assert source.repo is not None  # the schema guarantees repo or path
    return _from_hub(source.repo, source.revision, tier)


def local_model(source: ModelSection) -> Path | None:
    """The model's directory if it is on this machine already (never downloads); else None."""
    if source.path and source.path.startswith(SCHEME):
        try:
            return embedded_model(source.path)
        except ModelNotFoundError:
            return None
    if source.path:
        path = Path(source.path).expanduser()
        return path if (path / "config.json").is_file() else None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.repo, revision=source.revision, allow_patterns=MODEL_FILE_PATTERNS,
                                      local_files_only=True))
    except Exception:  # not in the cache (many error types): not local
        return None


def looks_like_repo_id(reference: str) -> bool:
    """'org/name' that is not a path on this machine (the rule `--model` follows too)."""
    return (not Path(reference).expanduser().exists() and reference.count("/") == 1
            and not reference.startswith((".", "/", "~")))


def resolve_reference(reference: str) -> Path:
    """A model as ``--model`` names it: ``embedded:NAME``, a model directory, or a repo id."""
    if reference.startswith(SCHEME):
        return embedded_model(reference)
    if looks_like_repo_id(reference):
        return _from_hub(reference, None, None)
    return model_directory(Path(reference), "model")


def model_directory(path: Path, label: str) -> Path:
    """``path`` if it holds an mlx-lm model (a config.json); else a one-line error saying what to pass."""
    path = path.expanduser()
    if not (path / "config.json").is_file():
        problem = "does not exist" if not path.exists() else "has no config.json"
        raise ModelNotFoundError(
            f"{label} {path} {problem}. Give an mlx-lm model directory (config.json, *.safetensors, "
            f"tokenizer files), a Hugging Face repo id (org/name) or embedded:demo-moe."
        )
    return path


def _from_hub(repo: str, revision: str | None, tier: str | None) -> Path:
    # Imported here: huggingface_hub is only needed when a tier names a repo.
    from huggingface_hub import snapshot_download

    try:
        # Already in the Hugging Face cache (HF_HOME): no network needed.
        return Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILE_PATTERNS,
                                      local_files_only=True))
    except Exception:
        pass
    who = f"Tier {tier!r}: model" if tier else "Model"
    pull = f"outlier pull {tier or repo}"
    try:
        log.info("downloading %s (revision %s)", repo, revision or "main")
        # snapshot_download resumes partial files and shows a tqdm progress bar per file.
        return Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as exc:  # offline, unknown repo, network errors: many types, one answer
        # Hugging Face's own text spans several lines; the log keeps it (-v), the error stays one line.
        log.info("download of %s failed: %s", repo, exc)
        raise ModelNotFoundError(
            f"{who} {repo!r} is not downloaded and could not be fetched ({type(exc).__name__}). "
            f"Run `{pull}` when online (and check the repo id), or set `[model] path` to a local "
            f"mlx-lm model directory (or pass --model PATH)."
        ) from exc
