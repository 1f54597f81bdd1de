"""Device selection, for every command's `--device` (torch only: camera runs must not load the teacher's spconv)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; any other name is passed to `torch.device`."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
