"""Small `torch.distributed` helpers: who am I, join a torchrun group, reduce logged values.

Every helper also works without a process group (one process: rank 0 of 1). DDP wrapping is the
caller's job; the engine only unwraps models to save them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank of this process on its machine, from torchrun's `LOCAL_RANK` (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes files and logs (rank 0)."""
    return rank() == 0


def init_from_env(*, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group described by torchrun's environment and return this process's device.

    With `WORLD_SIZE` > 1 the group uses NCCL when CUDA is available (one GPU per `LOCAL_RANK`) and
    gloo otherwise. Without torchrun nothing is initialised and the device is `cuda:0` or the CPU.
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return torch.device("cuda", local_rank()) if cuda else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (`[obj]` without a process group). Collective."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ranks_true(flag: bool | torch.Tensor) -> bool:
    """Whether `flag` holds on every rank. Collective; syncs with the device."""
    value = torch.as_tensor(flag).detach().reshape(()).to(torch.float32)
    if is_initialized():
        value = value.to(_comm_device())
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def reduce_dict(values: Mapping[str, torch.Tensor | float], *, average: bool = True) -> dict[str, float]:
    """Scalar values summed (or averaged) over ranks, as Python floats on every rank. Collective.

    Keys must be the same on every rank; they are sorted so that ranks agree on the order.
    """
    keys = sorted(values)
    if not keys:
        return {}
    device = _comm_device() if is_initialized() else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(values[k]).detach().to(device, torch.float64).reshape(()) for k in keys])
    if is_initialized():
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper, or `model` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) else model
