"""The training loop: optimizer steps over a DataLoader until `max_steps`, with hooks and exact resume.

Model protocol: in training mode `model(batch)` returns `dict[str, Tensor]` of already-weighted scalar
loss terms; the loss is their sum and every term is logged. Everything that is not the step itself
(checkpoints, metrics, progress, evaluation) is a hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from pipelines.errors import ConfigError, StxdError
from stxd_train.configs import AMP_MODES, AmpMode, TrainConfig  # noqa: F401  (re-exported)
from stxd_train.engine.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    capture_rng_state,
    checkpoint_dir,
    load_checkpoint,
    restore_rng_state,
)
from stxd_train.engine.distributed import all_gather_object, all_ranks_true, rank, unwrap_model, world_size
from stxd_train.engine.hooks import HookBase
from stxd_train.engine.sampler import ResumableSampler, StatefulBatchSampler, seed_everything

CHECKPOINT_FORMAT = 1


class TrainingError(StxdError):
    """Training cannot go on: a wrong model output, an empty loader, an existing run in the way."""


class NonFiniteLossError(TrainingError):
    """The loss of a step is NaN or infinite."""


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `amp` on `device`, or None for full precision."""
    if amp not in AMP_MODES:
        raise ConfigError(f"amp: found {amp!r}, expected one of {', '.join(AMP_MODES)}")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def to_device(obj: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """A copy of `obj` with every tensor on `device`, through dicts, lists, (named) tuples and dataclasses.

    Other values are returned as they are; `obj` itself is not modified.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking=non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device, non_blocking=non_blocking) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device, non_blocking=non_blocking) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device, non_blocking=non_blocking)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


class Trainer:
    """Runs optimizer steps until `max_steps`, calling hooks around them; `train(resume=True)` continues a run.

    The model is moved to `device`; wrap it in DDP (and build the optimizer) before handing it over.
    `scheduler` is stepped once per optimizer step; its horizon may be longer than `max_steps` (a run
    stopped early and resumed later keeps the same learning rates). With a `ResumableSampler` as the
    loader's `batch_sampler` a resumed run skips consumed batches without loading them; any other
    sampler is fast-forwarded by loading and dropping them, which is exact only if its order depends
    on the epoch alone (e.g. `DistributedSampler`). The global RNGs are seeded with `seed + rank` at
    the start of a fresh run and restored from the checkpoint on resume. `data_note` says how to check the
    data behind a batch (e.g. the command that verifies a teacher cache); a non-finite loss error quotes it.
    """

    def __init__(self, *, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler | None,
                 data: DataLoader, out_dir: str | Path, max_steps: int, hooks: Sequence[HookBase] = (),
                 device: torch.device | str = "cpu", grad_clip: float = 0.0, amp: AmpMode = "auto",
                 seed: int = 0, data_note: str = "") -> None:
        if max_steps < 1:
            raise ConfigError(f"Trainer max_steps: found {max_steps}, expected at least 1")
        if grad_clip < 0:
            raise ConfigError(f"Trainer grad_clip: found {grad_clip}, expected a max norm > 0, or 0 for no clipping")
        if isinstance(data.sampler, ResumableSampler):
            raise ConfigError("ResumableSampler is a batch sampler: pass it as DataLoader(..., batch_sampler=sampler) "
                              "without batch_size, not as sampler=")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.out_dir = Path(out_dir)
        self.max_steps = max_steps
        self.grad_clip = grad_clip
        self.seed = seed
        self.data_note = data_note
        self.amp_dtype = resolve_amp(amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        sampler = data.batch_sampler
        self.batch_sampler: StatefulBatchSampler | None = sampler if isinstance(sampler, StatefulBatchSampler) else None
        """The loader's batch sampler when it can save and restore its progress (else resume loads and drops)."""
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.trainer = weakref.proxy(self)
        # Progress, saved in checkpoints.
        self.step = 0
        """Optimizer steps done."""
        self.start_step = 0
        """`step` when `train` began (the checkpoint's step on resume)."""
        self.epoch = 0
        self.iter_in_epoch = 0
        """Batches of the current epoch trained on."""
        self._skip_batches = 0
        # What the last step did, for hooks.
        self.losses: dict[str, torch.Tensor] = {}
        """Detached loss terms of the last step."""
        self.loss = torch.zeros(())
        """Detached total loss of the last step."""
        self.lr = 0.0
        """Learning rate (first parameter group) the last step used."""
        self.grad_norm: torch.Tensor | None = None
        """Global gradient norm before clipping (None without clipping)."""
        self.step_time = 0.0
        self.data_time = 0.0
        self._seconds_before = 0.0
        self._started = time.perf_counter()

    @property
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir(self.out_dir)

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / LAST_CHECKPOINT

    def train(self, resume: bool = False) -> None:
        """Train until `max_steps`; with `resume`, first load `checkpoints/last.pt` and continue from it."""
        if resume:
            self.load_state_dict(load_checkpoint(self.last_checkpoint))
        else:
            if self.last_checkpoint.exists():
                raise TrainingError(f"{self.last_checkpoint} exists: {self.out_dir} already holds a run; resume it "
                                    "(--resume) or choose a new output folder")
            seed_everything(self.seed + rank())
        self.start_step = self.step
        self._started = time.perf_counter()
        self.model.train()
        for hook in self.hooks:
            hook.before_train()
        try:
            while self.step < self.max_steps:
                self._run_epoch()
        except BaseException:
            self._after_train(failed=True)
            raise
        self._after_train(failed=False)

    @property
    def train_seconds(self) -> float:
        """Wall-clock seconds spent on the steps done so far, over every resume: the time saved in the checkpoint
        that `train` resumed from plus this call's. Time after a run's last checkpoint that a kill lost is not
        counted (those steps are trained again, and counted then)."""
        return self._seconds_before + time.perf_counter() - self._started

    def _after_train(self, *, failed: bool) -> None:
        """Every hook's `after_train`, even when one raises (bars closed, files flushed); the first error is raised
        after them, unless training itself `failed`, whose error is then the one the caller sees."""
        first: BaseException | None = None
        for hook in self.hooks:
            try:
                hook.after_train()
            except BaseException as exc:
                first = first or exc
        if first is not None and not failed:
            raise first

    def _epoch_iterator(self) -> Any:
        for sampler in {id(s): s for s in (self.data.sampler, self.data.batch_sampler)}.values():
            set_epoch = getattr(sampler, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self.epoch)
        if self.batch_sampler is not None:
            self.batch_sampler.limit(self.max_steps - self.step)
        # Creating the iterator draws the workers' base seed from the global generator (unless the loader
        # has its own): forking keeps the training RNG stream the same whether or not a run was resumed.
        with torch.random.fork_rng(devices=[]):
            iterator = iter(self.data)
            for _ in range(self._skip_batches):
                next(iterator, None)
        self._skip_batches = 0
        return iterator

    def _run_epoch(self) -> None:
        iterator = self._epoch_iterator()
        fresh = self.iter_in_epoch == 0
        while self.step < self.max_steps:
            start = time.perf_counter()
            batch = next(iterator, _END)
            if batch is _END:
                break
            self.data_time = time.perf_counter() - start
            for hook in self.hooks:
                hook.before_step()
            self.run_step(batch)
            self.step_time = time.perf_counter() - start
            self.step += 1
            self.iter_in_epoch += 1
            if self.batch_sampler is not None:
                self.batch_sampler.advance(1)
            for hook in self.hooks:
                hook.after_step()
        else:
            return  # max_steps reached: the epoch stays open for a later resume
        if fresh and self.iter_in_epoch == 0:
            raise TrainingError(f"the data loader yielded no batch in epoch {self.epoch}; check the dataset length, "
                                "batch size and drop_last")
        self.epoch += 1
        self.iter_in_epoch = 0

    def run_step(self, batch: Any) -> None:
        """One optimizer step on `batch`: forward, checks, backward, clipping, optimizer and scheduler."""
        self.optimizer.zero_grad(set_to_none=True)
        batch = to_device(batch, self.device, non_blocking=self.device.type == "cuda")
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            output = self.model(batch)
        terms = self._loss_terms(output)
        total = sum((v.float() for v in terms.values()), start=torch.zeros((), device=self.device))
        if not all_ranks_true(torch.isfinite(total)):
            raise self._non_finite_error(total, terms, batch)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
        else:
            total.backward()
        if self.grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            self.grad_norm = nn.utils.clip_grad_norm_(self._params, self.grad_clip).detach()
        self.lr = float(self.optimizer.param_groups[0]["lr"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            with warnings.catch_warnings():
                # A GradScaler skips the optimizer step when gradients overflow; the schedule still follows the step.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
        self.losses = {k: v.detach() for k, v in terms.items()}
        self.loss = total.detach()

    def _loss_terms(self, output: Any) -> dict[str, torch.Tensor]:
        ok = (isinstance(output, Mapping) and len(output) > 0
              and all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in output.values()))
        if not ok:
            found = ({k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in output.items()}
                     if isinstance(output, Mapping) else type(output).__name__)
            raise TrainingError(f"{type(unwrap_model(self.model)).__name__}(batch) returned {found}; expected a "
                                "non-empty dict of scalar loss tensors, e.g. {'loss_cls': tensor(0.7)}")
        return dict(output)

    def _non_finite_error(self, total: torch.Tensor, terms: Mapping[str, torch.Tensor],
                          batch: Any) -> NonFiniteLossError:
        bad = {k: float(v.detach()) for k, v in terms.items() if not torch.isfinite(v)}
        where = f"step {self.step + 1} (epoch {self.epoch}, batch {self.iter_in_epoch} of the epoch)"
        if bad:
            what = ", ".join(f"{k!r} = {v}" for k, v in bad.items())
            found = f"loss term(s) {what} not finite (total {float(total.detach())})"
        elif torch.isfinite(total):
            found = "the loss is not finite on another rank"
        else:
            found = f"the terms are finite but their sum overflows to {float(total.detach())}"
        tokens = getattr(batch, "tokens", None)
        samples = (f" (sample(s) {', '.join(map(str, tokens))}{' on this rank' if world_size() > 1 else ''})"
                   if isinstance(tokens, Sequence) and not isinstance(tokens, str) and tokens else "")
        note = f"; {self.data_note}" if self.data_note else ""
        if self.last_checkpoint.is_file():
            then = f"the last checkpoint {self.last_checkpoint} is intact: continue from it with --resume"
        else:
            then = (f"no checkpoint was written before this step ({self.checkpoint_dir} holds none), so there is "
                    "nothing to resume: train again from the start")
        return NonFiniteLossError(f"{where}: {found}. Check this batch's inputs and targets{samples}{note}; lower "
                                  f"optim.lr or set optim.grad_clip; {then}")

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Collective under DDP: it gathers every rank's RNG states."""
        sampler = self.batch_sampler
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "iter_in_epoch": self.iter_in_epoch,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "sampler": None if sampler is None else sampler.state_dict(),
            "rng": all_gather_object(capture_rng_state()),
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved, RNG states included."""
        where = self.last_checkpoint
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {where} has format {state.get('format')!r}, expected "
                                  f"{CHECKPOINT_FORMAT}; it was not written by this trainer")
        try:
            unwrap_model(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {where} does not fit this model/optimizer: {exc}; resume with the "
                                  "model config of the run that wrote it") from exc
        if self.scheduler is not None:
            if state["scheduler"] is None:
                raise CheckpointError(f"checkpoint {where} has no scheduler state but this run has a scheduler")
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.iter_in_epoch = int(state["step"]), int(state["epoch"]), int(state["iter_in_epoch"])
        # Checkpoints written before the trainer saved its time have none: their steps count as 0 s.
        self._seconds_before = float(state.get("train_seconds", 0.0))
        sampler = self.batch_sampler
        if sampler is not None and state["sampler"] is not None:
            sampler.load_state_dict(state["sampler"])
        else:
            self._skip_batches = self.iter_in_epoch
        rngs = state["rng"]
        if len(rngs) != world_size():
            warnings.warn(f"checkpoint {where} was written by {len(rngs)} process(es), this run has {world_size()}: "
                          "random streams differ from an uninterrupted run", stacklevel=2)
        restore_rng_state(rngs[rank() % len(rngs)])


_END = object()
