"""AdamW and its learning-rate schedule, built from `OptimConfig`.

Both schedules are a pure function of the step (a `LambdaLR`), so a resumed run gets exactly the
learning rates of an uninterrupted one and the schedule itself is never stored in a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipelines.config import require
from pipelines.errors import ConfigError

Schedule = Literal["onecycle", "cosine"]
SCHEDULES: tuple[str, ...] = ("onecycle", "cosine")
# Warm-up fraction when neither `warmup_steps` nor `pct_start` is given.
_DEFAULT_PCT_START = {"onecycle": 0.4, "cosine": 0.0}
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with a warm-up and a cosine decay; `grad_clip` is handed to the `Trainer`."""

    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay (not on norms, biases)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW (beta1, beta2)"})
    schedule: Schedule = field(default="cosine", metadata={
        "help": "onecycle: cosine warm-up then cosine decay; cosine: linear warm-up then cosine decay"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warm-up length in steps (or pct_start)"})
    pct_start: float | None = field(default=None, metadata={
        "help": "warm-up length as a fraction of max_steps (or warmup_steps); default 0.4 onecycle, 0 cosine"})
    start_lr_ratio: float = field(default=0.1, metadata={"help": "learning rate at step 0, as a fraction of lr"})
    min_lr_ratio: float = field(default=1e-3, metadata={"help": "learning rate after max_steps, as a fraction of lr"})
    grad_clip: float = field(default=35.0, metadata={"help": "max global gradient norm; 0 turns clipping off"})

    def __post_init__(self) -> None:
        if self.warmup_steps is not None and self.pct_start is not None:
            raise ConfigError(f"optim: can't provide both warmup_steps ({self.warmup_steps}) and pct_start "
                              f"({self.pct_start}). Choose one.")
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
             "two numbers in [0, 1)"),
            (self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0"),
            (self.pct_start is None or 0 <= self.pct_start < 1, "pct_start", self.pct_start, "in [0, 1)"),
            (0 < self.start_lr_ratio <= 1, "start_lr_ratio", self.start_lr_ratio, "in (0, 1]"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip", self.grad_clip, "a max norm > 0, or 0 for no clipping"),
        ]
        require("optim config", checks)

    def warmup_for(self, max_steps: int) -> int:
        """Warm-up length in steps for a run of `max_steps` steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        pct = self.pct_start if self.pct_start is not None else _DEFAULT_PCT_START[self.schedule]
        return round(pct * max_steps)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    """AdamW over the trainable parameters; norm layers, biases and other 0/1-d tensors get no weight decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim <= 1 or isinstance(module, _NORM_TYPES) else decay).append(param)
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if params]
    if not groups:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters; nothing to optimise")
    return AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int, start_ratio: float,
              min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak.

    Warm-up from `start_ratio` to 1 over `warmup_steps` (cosine-shaped for onecycle, linear for
    cosine), then a cosine decay that reaches `min_ratio` after `total_steps` steps and stays there.
    """
    if step < warmup_steps:
        t = step / warmup_steps
        shape = (1.0 - math.cos(math.pi * t)) / 2.0 if schedule == "onecycle" else t
        return start_ratio + (1.0 - start_ratio) * shape
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * (1.0 + math.cos(math.pi * t)) / 2.0


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, max_steps: int) -> LambdaLR:
    """The schedule of `cfg` over `max_steps` steps; the trainer steps it once per optimizer step.

    `max_steps` is the schedule's horizon: a `Trainer` may stop earlier (and be resumed to the end).
    """
    warmup = cfg.warmup_for(max_steps)
    if max_steps < 1 or warmup >= max_steps:
        raise ConfigError(f"optim: warm-up of {warmup} steps in a run of {max_steps} steps; expected "
                          "max_steps >= 1 and a shorter warm-up: lower warmup_steps / pct_start or raise max_steps")
    factor = partial(lr_factor, schedule=cfg.schedule, total_steps=max_steps, warmup_steps=warmup,
                     start_ratio=cfg.start_lr_ratio, min_ratio=cfg.min_lr_ratio)
    return LambdaLR(optimizer, lr_lambda=factor)
