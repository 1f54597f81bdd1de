"""Project errors. Every message names the file, field or token, what was found, what was expected
and what to do next; the CLIs print them as one paragraph without a traceback."""

from __future__ import annotations


class StxdError(Exception):
    """Base class of every error that a user of stxd can cause and fix."""


class ConfigError(StxdError):
    """A config file or a `--set` override is wrong (unknown key, wrong type, bad value)."""


class DatasetError(StxdError):
    """A nuScenes root is missing, incomplete or inconsistent."""


class SplitError(DatasetError):
    """A split name that is neither predefined nor in the root's `splits.json`."""


class SensorFileError(DatasetError):
    """A LiDAR or camera file that is missing or cannot be parsed."""
