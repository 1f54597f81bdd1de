"""AdamW and its learning-rate schedule, built from `OptimConfig`.

Both schedules are a pure function of the step (a `LambdaLR`), so a resumed run gets exactly the
learning rates of an uninterrupted one and the schedule itself is never stored in a checkpoint.
"""

from __future__ import annotations

import math
from functools import partial

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipelines.errors import ConfigError
from stxd_train.configs import SCHEDULES, OptimConfig, Schedule  # noqa: F401  (re-exported)

# Warm-up fraction when neither `warmup_steps` nor `pct_start` is given.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


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
