"""One exception family for everything a user can get wrong.

Every error names the thing at fault and the fix, so the command line prints ``str(error)`` and exits 2
without a traceback. Anything else that escapes is a bug: the command line exits 1 and keeps its traceback.
"""
from __future__ import annotations

import difflib


def did_you_mean(word, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
