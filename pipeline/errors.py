"""Errors that mean "bad input". The CLI prints them as one line ``error: ...`` and exits 2.

Anything else that escapes is an unexpected failure: exit code 1 with a traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Bad user input: a config key, a CLI value, a data file, a missing checkpoint.

    The message names the offending key or file and what was expected.
    """


class ConfigError(PipelineError):
    """An invalid configuration: unknown key, wrong type, out-of-range or conflicting value."""


class DataError(PipelineError):
    """Unusable input data: a missing, unreadable or empty structure file or directory."""


class CheckpointError(PipelineError):
    """A checkpoint that is missing, corrupt, or does not fit the configured model."""


class DiskFullError(Exception):
    """The disk filled up during a run. Not bad input (exit 1), but a clean stop: the run
    ends FAILED with this one line, and the last good checkpoint is kept for a resume."""
