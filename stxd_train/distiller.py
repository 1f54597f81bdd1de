"""STXD in a training step: the student's detection loss plus CD, TD, RD (and the MSE baseline) against the
teacher's cached record of each sample.

The adapted student BEV is `adapter(out.bev)`: a 1×1 conv (or a small stack of them) from the student's
channels to the teacher's. The teacher BEV of the cache (on the distillation grid) is resampled to the
student grid, whose range must be the same. TD pools the adapted student BEV to the cache's token grid; RD
reads the student's dense head at each teacher box's centre cell (π, `CenterHead.read_at`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import require
from pipelines.errors import ConfigError
from pipelines.grid import BEVGrid, resample
from stxd_train.distill import correlation_loss, feature_mse, response_loss, temporal_loss

if TYPE_CHECKING:
    from stxd_train.online import OnlineTeacher

TERMS = ("cd", "td", "rd", "mse")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Which distillation terms a fit adds to the detection loss, and their weights and knobs."""

    terms: tuple[str, ...] = field(default=(), metadata={"help": "any of cd, td, rd, mse; empty: no distillation"})
    alpha_cd: float = field(default=1.0, metadata={"help": "weight of the correlation loss"})
    alpha_td: float = field(default=1.0, metadata={"help": "weight of the temporal loss"})
    alpha_rd: float = field(default=1.0, metadata={"help": "weight of the response loss"})
    alpha_mse: float = field(default=1.0, metadata={"help": "weight of the feature MSE baseline"})
    lambda_c: float = field(default=0.005, metadata={"help": "CD weight of the off-diagonal correlations"})
    tau: float = field(default=0.1, metadata={"help": "TD softmax temperature"})
    gamma: float = field(default=0.5, metadata={"help": "RD quality exponent: q = score^(1-γ) · IoU^γ"})
    k: int = field(default=2, metadata={"help": "TD past frames K, at most the cache's k_max"})
    tokens: int = field(default=0, metadata={"help": "TD token grid P; 0: the cache's; else a divisor of it"})
    adapter_channels: tuple[int, ...] = field(default=(), metadata={
        "help": "hidden widths of the 1×1-conv adapter (with BN and ReLU); empty: a single 1×1 conv"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.terms) - set(TERMS))
        require("distill", [
            (not unknown and len(set(self.terms)) == len(self.terms), "terms", list(self.terms),
             f"distinct names among {', '.join(TERMS)}"),
            (min(self.alpha_cd, self.alpha_td, self.alpha_rd, self.alpha_mse) >= 0, "alpha_*",
             (self.alpha_cd, self.alpha_td, self.alpha_rd, self.alpha_mse), "weights >= 0"),
            (self.lambda_c >= 0, "lambda_c", self.lambda_c, ">= 0"),
            (self.tau > 0, "tau", self.tau, "> 0"),
            (0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]"),
            (self.k >= 1, "k", self.k, "at least 1 past frame"),
            (self.tokens >= 0, "tokens", self.tokens, ">= 0"),
            (all(c >= 1 for c in self.adapter_channels), "adapter_channels", self.adapter_channels, "widths >= 1"),
        ])

    @property
    def enabled(self) -> bool:
        return bool(self.terms)


def bev_tokens(bev: torch.Tensor, token_grid: int) -> torch.Tensor:
    """(B, C, H, W) → (B, P·P, C): means of P×P blocks in the cache's token order
    (`stxd_cache.schema.pool_tokens`); H and W must be multiples of P."""
    return F.adaptive_avg_pool2d(bev, token_grid).flatten(2).transpose(1, 2)


def build_adapter(in_channels: int, out_channels: int, hidden: Sequence[int]) -> nn.Sequential:
    """1×1 convs from the student's channels to the teacher's, with BN and ReLU between them."""
    layers: list[nn.Module] = []
    c = in_channels
    for width in hidden:
        layers += [nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
    layers.append(nn.Conv2d(c, out_channels, 1))
    return nn.Sequential(*layers)


def adapter_from_state(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The adapter whose `state_dict()` is `state` (its widths are read from the conv weights)."""
    convs = sorted({int(k.split(".")[0]) for k in state if k.endswith("weight") and state[k].dim() == 4})
    widths = [state[f"{i}.weight"].shape[0] for i in convs]
    adapter = build_adapter(state[f"{convs[0]}.weight"].shape[1], widths[-1], widths[:-1])
    adapter.load_state_dict(state)
    return adapter


class Distiller(nn.Module):
    """The engine's model in a distilled fit: a `CameraStudent` and its adapter; a batch with cache records in,
    detection and distillation loss terms out (`loss_cd`, `loss_td`, `loss_rd`, `loss_mse`, already weighted)."""

    def __init__(self, *, student: nn.Module, cfg: DistillConfig, teacher_grid: BEVGrid, teacher_channels: int,
                 token_grid: int, k_max: int, online: OnlineTeacher | None = None) -> None:
        """
        Args:
            student: a `CameraStudent`.
            cfg: the terms and their knobs.
            teacher_grid, teacher_channels, token_grid, k_max: the cache layout (its meta, or the layout an
                online teacher imitates).
            online: a live teacher that computes the records at every step instead of the cache.
        """
        super().__init__()
        if cfg.k > k_max:
            raise ConfigError(f"distill.k is {cfg.k} but the cache holds {k_max} past frames (k_max); set "
                              f"distill.k <= {k_max} or extract a cache with a larger k_max")
        tokens = cfg.tokens or token_grid
        if token_grid % tokens:
            raise ConfigError(f"distill.tokens is {tokens}, which does not divide the cache's token grid "
                              f"{token_grid}; use 0 (the cache's) or a divisor of {token_grid}")
        if not teacher_grid.same_range(student.grid):
            raise ConfigError(f"the cache's distillation grid {teacher_grid.describe()} and the student grid "
                              f"{student.grid.describe()} cover different areas; the ranges must match")
        rows, cols = student.grid.shape
        if rows % tokens or cols % tokens:
            raise ConfigError(f"the student grid {rows}x{cols} is not divisible by the TD token grid {tokens}")
        self.student = student
        self.online = online     # a plain attribute: the frozen teacher is not part of this module's state
        self.cfg = cfg
        self.teacher_grid = teacher_grid
        self.token_grid, self.tokens = token_grid, tokens
        # RD alone reads the head, not the BEV: no adapter then (DDP needs every parameter to get a gradient).
        needs_adapter = bool({"cd", "td", "mse"} & set(cfg.terms))
        self.adapter = (build_adapter(student.head.shared_conv.conv.in_channels, teacher_channels,
                                      cfg.adapter_channels) if needs_adapter else None)

    def _teacher_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., P_c², C) cache tokens re-pooled to (..., P², C)."""
        if self.tokens == self.token_grid:
            return tokens
        *lead, _, c = tokens.shape
        grid = tokens.reshape(-1, self.token_grid, self.token_grid, c).permute(0, 3, 1, 2)
        return bev_tokens(grid, self.tokens).reshape(*lead, self.tokens**2, c)

    def forward(self, batch) -> dict[str, torch.Tensor]:  # a `stxd_train.data.CameraBatch` with `cache`
        if batch.cache is not None:
            record = batch.cache
        elif self.online is not None and batch.points is not None:
            record = self.online.records(batch.points)
        else:
            raise ConfigError("distillation needs teacher records: pass --cache CACHE.zarr or --teacher-online CKPT")
        out = self.student(batch)
        losses = self.student.loss(out, batch.gt_boxes, batch.gt_labels)
        losses.update(self.distill_terms(out, record, batch.gt_boxes))
        return losses

    def distill_terms(self, out, cache: dict[str, torch.Tensor],
                      gt_boxes: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted distillation terms of one batch from its teacher record (the cache's fields, or the same
        fields computed by a live teacher)."""
        cfg, terms = self.cfg, {}
        adapted = self.adapter(out.bev) if self.adapter is not None else None             # (B, C_t, H, W)
        if "cd" in cfg.terms or "mse" in cfg.terms:
            teacher = resample(cache["bev"].to(adapted.dtype), self.teacher_grid, self.student.grid)
            if "cd" in cfg.terms:
                f = teacher.permute(0, 2, 3, 1).flatten(0, 2)
                g = adapted.permute(0, 2, 3, 1).flatten(0, 2)
                terms["loss_cd"] = cfg.alpha_cd * correlation_loss(f, g, cfg.lambda_c)
            if "mse" in cfg.terms:
                terms["loss_mse"] = cfg.alpha_mse * feature_mse(teacher, adapted)
        if "td" in cfg.terms:
            student_tokens = bev_tokens(adapted, self.tokens)
            k = cfg.k
            terms["loss_td"] = cfg.alpha_td * temporal_loss(
                self._teacher_tokens(cache["tokens"]), self._teacher_tokens(cache["past_tokens"][:, :k]),
                student_tokens, cache["past_valid"][:, :k], tau=cfg.tau)
        if "rd" in cfg.terms:
            count = cache["count"]
            m = cache["boxes"].shape[1]
            valid = torch.arange(m, device=count.device)[None, :] < count[:, None]
            student_boxes, student_probs, valid = self.student.head.read_at(
                out.preds, self.student.grid, cache["boxes"], cache["labels"], valid)
            terms["loss_rd"] = cfg.alpha_rd * response_loss(
                cache["boxes"], cache["probs"], cache["scores"], gt_boxes, student_boxes, student_probs,
                gamma=cfg.gamma, valid=valid, iou=cache.get("iou"))
        return terms
