"""One exception family for everything a user can get wrong.

Every error names the thing at fault and the fix, so the command line can print
``str(error)`` and exit without a traceback.
"""
from __future__ import annotations


class EdgeEmollamaError(Exception):
    """Base class: a message that names the thing at fault and the fix."""


class ConfigError(EdgeEmollamaError):
    """A configuration file or value that cannot be used."""


class CheckpointError(EdgeEmollamaError):
    """A checkpoint that is missing, corrupt, or does not match the architecture."""


class MissingDependencyError(EdgeEmollamaError):
    """An optional library that a chosen feature needs is not installed."""


class ArtifactError(EdgeEmollamaError):
    """Exported artifacts that are missing, stale, or do not match their manifest."""


class InputError(EdgeEmollamaError):
    """Runtime input of the wrong shape or kind, or a source that cannot be opened."""


class OutputError(EdgeEmollamaError):
    """An output location that cannot be written."""
