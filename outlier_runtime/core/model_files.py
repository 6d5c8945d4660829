"""A model directory's small files, checked before mlx-lm or transformers read them.

mlx-lm and transformers answer an empty, garbled or missing ``config.json`` or tokenizer
file, or an architecture they do not know, with a traceback from deep inside. This names
the file and the fix in one line instead (a :class:`ModelFileError`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from outlier_runtime.core.errors import CheckpointError

CONFIG_FILE = "config.json"
#: JSON files the tokenizer loader reads when they are present.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: At least one of these holds the vocabulary.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "tiktoken.model")
#: Config files are small; a huge one is not a config (and would be read whole).
MAX_JSON_BYTES = 64 * 2**20
REFETCH = "re-download the model (huggingface-cli download REPO) or point the tier at a complete mlx-lm model directory"


class ModelFileError(CheckpointError):
    """A model directory's configuration or tokenizer file is missing, unreadable or malformed."""


def _read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing ({what}); {REFETCH}", str(path)) from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it: {exc.strerror or exc}; fix its permissions", str(path)) from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"{path}: not a regular file ({what}); replace it with the real file", str(path))
    if info.st_size == 0:
        raise ModelFileError(f"{path}: empty ({what}); {REFETCH}", str(path))
    if info.st_size > limit:
        raise ModelFileError(f"{path}: {info.st_size} bytes is far too large for {what}; {REFETCH}", str(path))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it: {exc.strerror or exc}; fix its permissions", str(path)) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{path}: not valid UTF-8 JSON ({exc}); {REFETCH}", str(path)) from None


def check_model_dir(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check ``config.json`` (a JSON object with a ``model_type`` mlx-lm knows) and the tokenizer
    files; return the config. Reads no weights."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    config = _read_json(config_path, "the model's configuration")
    if not isinstance(config, dict):
        raise ModelFileError(f"{config_path}: expected a JSON object, found {type(config).__name__}; {REFETCH}",
                             str(config_path))
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelFileError(f"{config_path}: no `model_type` string (e.g. \"llama\"); {REFETCH}", str(config_path))
    _check_architecture(config_path, config)
    for name in TOKENIZER_JSON_FILES:
        path = model_dir / name
        if os.path.lexists(path):
            data = _read_json(path, "a tokenizer file")
            if not isinstance(data, dict):
                raise ModelFileError(f"{path}: expected a JSON object, found {type(data).__name__}; {REFETCH}",
                                     str(path))
    for name in VOCABULARY_FILES[1:]:
        path = model_dir / name
        if os.path.lexists(path):
            _check_readable(path)
    if not any(os.path.lexists(model_dir / name) for name in VOCABULARY_FILES):
        raise ModelFileError(f"{model_dir}: no tokenizer (none of {', '.join(VOCABULARY_FILES)}); {REFETCH}",
                             str(model_dir))
    return config


def _check_readable(path: Path) -> None:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"{path}: not a regular file (a tokenizer file); replace it with the real file",
                                 str(path))
        if info.st_size == 0:
            raise ModelFileError(f"{path}: empty (a tokenizer file); {REFETCH}", str(path))
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it: {exc.strerror or exc}; fix its permissions", str(path)) from None


def _check_architecture(config_path: Path, config: dict[str, Any]) -> None:
    import mlx_lm
    import mlx_lm.utils

    classes = getattr(mlx_lm.utils, "_get_classes", None)  # how mlx-lm itself picks the model class
    if classes is None:
        return
    try:
        classes(config)
    except (ValueError, ImportError) as exc:
        raise ModelFileError(
            f"{config_path}: model_type {config.get('model_type')!r} is not an architecture mlx-lm "
            f"{getattr(mlx_lm, '__version__', '')} knows ({exc}); upgrade mlx-lm, or fix model_type", str(config_path)
        ) from None
