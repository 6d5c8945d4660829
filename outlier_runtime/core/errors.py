"""The project's exception types: every one says what went wrong and what to do."""

from __future__ import annotations


class OutlierError(Exception):
    """Base class for every error outlier-runtime raises on purpose."""


class ManifestError(OutlierError):
    """A tier manifest is malformed: names the file, the TOML key path and what was expected."""


class TierNotFoundError(OutlierError):
    """No manifest defines the requested tier."""


class PluginError(OutlierError):
    """A plugin is unknown, duplicated, or broken."""


class ModelNotFoundError(OutlierError):
    """A model could not be found locally and could not be downloaded."""


class AdmissionError(OutlierError):
    """This machine does not have the memory a tier needs."""


class CheckpointError(OutlierError):
    """A checkpoint file (shard, index, pack) is missing, truncated or inconsistent."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class ExpertReadError(CheckpointError):
    """Reading an expert's bytes from disk failed."""


class RuntimeClosedError(OutlierError):
    """The runtime was closed and can no longer generate."""


class ParameterError(OutlierError):
    """A generation or load parameter is out of range: names it, the value and the range allowed."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        #: The parameter's name (``max_tokens``, ``prompt``, ...), for a server's error body.
        self.param = param


class DiskSpaceError(OutlierError):
    """The disk lacks the free space a download needs."""


class ExactnessError(OutlierError):
    """The paged engine cannot run a call the way the resident model would (so it refuses)."""


class DistributedError(OutlierError):
    """A distributed (multi-rank) run lost a peer or cannot start: names this rank and the peer."""
