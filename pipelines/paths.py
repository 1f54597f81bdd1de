"""Output paths of every command, checked before anything is created or removed.

An unset shell variable (`--out "$UNSET"`), a typo or a copy-paste must never point a command at the working
directory, the filesystem root or the dataset it reads: those are refused here, with the reason, before the
command touches the disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pipelines.errors import StxdError


class OutputPathError(StxdError):
    """An output path that a command refuses to write to (empty, the working directory, an input, ...)."""


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def check_output_path(path: str | os.PathLike[str] | None, *, option: str = "--out",
                      inputs: Mapping[str, str | os.PathLike[str] | None] | None = None) -> Path:
    """`path` as a `Path`, once it is known to be a safe place for a command's output; raises `OutputPathError`.

    Refused: an empty path; `.`, the working directory or any folder above it (`/` included); a dangling symbolic
    link; a path whose parent folder does not exist; and each of `inputs` (name → path, e.g. `{"--dataroot": ...}`)
    or a folder above one. URLs (`scheme://...`) are passed through unchecked.
    """
    text = "" if path is None else os.fspath(path)
    if not text.strip():
        raise OutputPathError(f"{option} is empty (an unset shell variable?); expected a path to write to, e.g. "
                              f"{option} out/run1")
    if "://" in text:
        return Path(text)
    real, cwd = _real(text), _real(os.getcwd())
    if real == cwd or real in cwd.parents:
        where = "the working directory" if real == cwd else "a folder above the working directory"
        raise OutputPathError(f"{option} {text!r} is {where} ({real}); a command's output goes into a folder of "
                              f"its own: pass a new path such as {option} out/run1")
    if os.path.islink(text) and not os.path.exists(text):
        raise OutputPathError(f"{option} {text!r} is a symbolic link to {os.readlink(text)!r}, which does not "
                              "exist; remove the link or make its target, or choose another path")
    parent = real.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {text!r}: its parent folder {parent} does not exist; create it first "
                              f"(mkdir -p {parent}) or fix the path")
    for name, given in (inputs or {}).items():
        if given is None or not os.fspath(given) or "://" in os.fspath(given):
            continue
        source = _real(given)
        if real == source or real in source.parents:
            what = "is" if real == source else "holds"
            raise OutputPathError(f"{option} {text!r} {what} {name} {os.fspath(given)!r}; writing there could "
                                  f"overwrite what the command reads; choose an output path outside {name}")
    return Path(text)
