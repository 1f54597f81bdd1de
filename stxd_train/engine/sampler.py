"""Reproducible data order and randomness: a resumable batch sampler, seeding and worker seeds.

The data order of an epoch depends only on (seed, epoch), and `ResumableSampler` records how much
of the current epoch the loop has trained on, so that a resumed run skips exactly those samples
without loading them.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Sampler

from pipelines.config import require
from pipelines.errors import ConfigError
from stxd_train.engine.checkpoint import CheckpointError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixed from (seed, epoch), so that nearby pairs such as (0, 1) and (1, 0) differ."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@runtime_checkable
class StatefulBatchSampler(Protocol):
    """What the trainer needs from a batch sampler to resume mid-epoch without loading skipped batches."""

    def set_epoch(self, epoch: int) -> None: ...

    def limit(self, batches: int | None) -> None: ...

    def advance(self, batches: int = 1) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class ResumableSampler(Sampler[list[int]]):
    """A batch sampler (yields lists of indices) whose order depends only on (seed, epoch).

    Pass it as `DataLoader(dataset, batch_sampler=sampler)`. Being a batch sampler, it knows the batch
    size, so resuming skips whole batches of indices before any sample is loaded.

    Order of an epoch: a permutation of `range(length)` drawn from `epoch_seed(seed, epoch)` (the
    identity without `shuffle`); with `drop_last` it is cut to whole global batches of
    `batch_size * world_size` samples, otherwise its head is repeated until its length divides by
    `world_size`, so that every rank gets the same number of batches (the last one may be smaller).
    Rank `r` takes samples `r, r + world_size, ...` of each global batch.

    Progress: DataLoader workers prefetch, so the sampler cannot count what was trained on; the loop
    calls `advance()` after each batch. `state_dict()` counts consumed samples in the global order,
    so a run resumed with another world size continues with the next unseen samples.
    """

    def __init__(self, length: int, *, batch_size: int, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, tag_epoch: bool = False) -> None:
        checks = [
            (length >= 1, "length", length, "at least 1 sample"),
            (batch_size >= 1, "batch_size", batch_size, "at least 1"),
            (seed >= 0, "seed", seed, "a non-negative integer"),
            (world_size >= 1, "world_size", world_size, "at least 1"),
            (0 <= rank < world_size, "rank", rank, f"in [0, {world_size})"),
            (not drop_last or length >= batch_size * world_size, "length", length,
             f"at least one global batch ({batch_size} x {world_size} ranks) with drop_last"),
        ]
        require("ResumableSampler", checks)
        self.length = length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.tag_epoch = tag_epoch
        """Yield `epoch * length + i` instead of `i`, so a dataset can seed per-epoch randomness exactly."""
        self.epoch = 0
        self.consumed_samples = 0
        """Samples of the current epoch's global order that the loop has trained on."""
        self.max_batches: int | None = None
        """If set, an iteration stops after this many batches (see `limit`)."""

    @property
    def global_batch(self) -> int:
        """Samples per step over all ranks."""
        return self.batch_size * self.world_size

    @property
    def epoch_samples(self) -> int:
        """Length of an epoch's global order after padding or cutting."""
        if self.drop_last:
            return self.length // self.global_batch * self.global_batch
        return math.ceil(self.length / self.world_size) * self.world_size

    def __len__(self) -> int:
        """Batches per rank in a whole epoch (whatever was already consumed)."""
        return math.ceil(self.epoch_samples / self.global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        """(epoch_samples,) int64: the global sample order of `epoch`."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.length, generator=generator)
        else:
            perm = torch.arange(self.length)
        n = self.epoch_samples
        return perm[:n] if n <= self.length else perm.repeat(math.ceil(n / self.length))[:n]

    def __iter__(self) -> Iterator[list[int]]:
        # Eager, so that what is skipped is fixed when the DataLoader creates its iterator.
        order = self.order(self.epoch)
        starts = range(self.consumed_samples, len(order), self.global_batch)
        offset = self.epoch * self.length if self.tag_epoch else 0
        batches = [(order[s:s + self.global_batch][self.rank::self.world_size] + offset).tolist() for s in starts]
        return iter(batches[:self.max_batches])

    def limit(self, batches: int | None) -> None:
        """Stop the next iterations after `batches` batches (None: the whole epoch).

        The loop limits the sampler to the steps it has left, so that the last epoch's DataLoader ends by
        itself: its workers are idle when they are shut down. Dropping an iterator whose workers are still
        sending prefetched batches can abort them mid-send (a torch race at interpreter exit).
        """
        self.max_batches = batches

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; the current epoch keeps its progress (for a resumed loop)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed_samples = 0

    def advance(self, batches: int = 1) -> None:
        """Record that the loop trained on `batches` more batches of the current epoch."""
        self.consumed_samples = min(self.consumed_samples + batches * self.global_batch, self.epoch_samples)

    def state_dict(self) -> dict[str, Any]:
        """Epoch and progress, plus what must match on resume (length, seed, shuffle, drop_last)."""
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples, "length": self.length,
                "seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the epoch of `state`: the next iteration skips its consumed samples."""
        for key in ("length", "seed", "shuffle", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise CheckpointError(
                    f"the checkpoint's sampler has {key}={state.get(key)!r} but this run's has "
                    f"{key}={getattr(self, key)!r}; an exact resume needs the same dataset and data seed: "
                    "restore them or start a new run in a new output folder"
                )
        self.epoch = int(state["epoch"])
        self.consumed_samples = min(int(state["consumed_samples"]), self.epoch_samples)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every CUDA device included)."""
    if seed < 0:
        raise ConfigError(f"seed: found {seed}, expected a non-negative integer")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global generator is what gets seeded
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed Python and NumPy from the worker's torch seed.

    torch seeds each worker with the loader's base seed + `worker_id`; with `loader_generator(seed)`
    that base seed is reproducible, so worker-side randomness is too.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002


def loader_generator(seed: int) -> torch.Generator:
    """A seeded generator for `DataLoader(generator=...)`: the workers' base seeds come from it."""
    return torch.Generator().manual_seed(seed)


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Inside the block torch picks deterministic kernels (warning where none exists); restored after.

    On CUDA, cuBLAS also needs `CUBLAS_WORKSPACE_CONFIG`, which is set here if absent; it only takes
    effect when set before the first cuBLAS call, so enter this block before building the model.
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
