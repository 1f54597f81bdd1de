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



class CheckpointError(StxdError):
    """A checkpoint (a teacher's, a student's or a training run's) that is missing, unreadable, or does not fit the
    model or the run that loads it."""


def torch_load_reason(error: BaseException) -> str:
    """Why `torch.load` failed, in one line: the safe unpickler's own reason when there is one, without torch's
    advice to turn `weights_only` off (which would run whatever code the file carries)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").split(" Please ")[0].strip()
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"
