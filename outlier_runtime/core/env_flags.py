"""Boolean environment variables, read strictly: a typo is an error, never a silent "off"."""

from __future__ import annotations

import os

from outlier_runtime.core.errors import ParameterError

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})

#: Switches every paged tier to mmap reads (see ``[paging] mmap_experts``).
MMAP_EXPERTS_ENV = "OUTLIER_MMAP_EXPERTS"


def env_flag(name: str) -> bool | None:
    """The boolean value of environment variable ``name``, or None when it is unset or empty."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ParameterError(
        f"environment variable {name}={raw!r}: expected 1/0, true/false, yes/no or on/off; "
        f"fix it or unset it."
    )


def check_env_flags() -> None:
    """Refuse a malformed boolean environment variable before anything reads it loosely."""
    env_flag(MMAP_EXPERTS_ENV)
