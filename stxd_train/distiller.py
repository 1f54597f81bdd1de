"""STXD in a training step: the student's detection loss plus CD, TD, RD (and the MSE baseline) against the
teacher's cached record of each sample.

The adapted student BEV is `adapter(out.bev)`: a 1×1 conv (or a small stack of them) from the student's
channels to the teacher's. The teacher BEV of the cache (on the distillation grid) is resampled to the
student grid, whose range must be the same. TD pools the adapted student BEV to the cache's token grid; RD
reads the student's dense head at each teacher box's centre cell (π, `CenterHead.read_codes_at`).

Beside the paper's losses, `DistillConfig` holds the knobs that measurements called for, each with the paper's
reading as an option: RD in the head's own code space and weights, a class-aware and flip-aware quality,
foreground weights for the feature terms (CD, TD, MSE), and a warm-up of the distillation weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipelines.errors import ConfigError
from pipelines.grid import BEVGrid, resample
from stxd_cache.schema import bev_tokens
from stxd_cache.teacher.center_head import boxes_from_codes, codes_from_boxes
from stxd_train.configs import FG_MASKS, RD_SPACES, TERMS, DistillConfig  # noqa: F401  (re-exported)
from stxd_train.distill import correlation_loss, feature_mse, quality_weights, response_loss, temporal_loss
from stxd_train.distill.foreground import cell_weights, gt_foreground, teacher_foreground
from stxd_train.distill.response import decoded_codes
from stxd_train.engine.distributed import unwrap_model
from stxd_train.engine.hooks import HookBase

if TYPE_CHECKING:
    from stxd_train.data import CameraBatch, TeacherBatch
    from stxd_train.online import OnlineTeacher
    from stxd_train.students.common import CameraStudent

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


def require_layout(cfg: DistillConfig, *, k_max: int, token_grid: int) -> int:
    """The TD token grid P that `cfg` uses with records of `k_max` past frames and `token_grid` tokens a side (the
    cache's layout, or the one an online teacher imitates); a `ConfigError` when `cfg.k` or `cfg.tokens` does not
    fit them."""
    if cfg.k > k_max:
        raise ConfigError(f"distill.k is {cfg.k} but the cache holds {k_max} past frames (k_max); set "
                          f"distill.k <= {k_max} or extract a cache with a larger k_max")
    tokens = cfg.tokens or token_grid
    if token_grid % tokens:
        raise ConfigError(f"distill.tokens is {tokens}, which does not divide the cache's token grid "
                          f"{token_grid}; use 0 (the cache's) or a divisor of {token_grid}")
    return tokens


class Distiller(nn.Module):
    """The engine's model in a distilled fit: a `CameraStudent` and its adapter; a batch with cache records in,
    detection and distillation loss terms out (`loss_cd`, `loss_td`, `loss_rd`, `loss_mse`, already weighted)."""

    def __init__(self, *, student: CameraStudent, cfg: DistillConfig, teacher_grid: BEVGrid, teacher_channels: int,
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
        tokens = require_layout(cfg, k_max=k_max, token_grid=token_grid)
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
        self.adapter = (build_adapter(student.bev_channels, teacher_channels,
                                      cfg.adapter_channels) if needs_adapter else None)
        self.step: int | None = None
        """The optimizer step about to run (0 for the first), for the warm-up; set by `DistillStepHook` in a fit.
        None (e.g. a benchmark calling the model directly): the weights are at their alpha_*."""

    def _teacher_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., P_c², C) cache tokens re-pooled to (..., P², C)."""
        if self.tokens == self.token_grid:
            return tokens
        *lead, _, c = tokens.shape
        grid = tokens.reshape(-1, self.token_grid, self.token_grid, c).permute(0, 3, 1, 2)
        return bev_tokens(grid, self.tokens).reshape(*lead, self.tokens**2, c)

    def forward(self, batch: CameraBatch) -> dict[str, torch.Tensor]:
        if batch.cache is not None:
            record = batch.cache
        elif self.online is not None and batch.points is not None:
            record = self.online.records(batch.points)
        else:
            raise ConfigError("distillation needs teacher records: pass --cache CACHE.zarr or --teacher-online CKPT")
        out = self.student(batch)
        losses = self.student.loss(out, batch.gt_boxes, batch.gt_labels)
        losses.update(self.distill_terms(out, record, batch.gt_boxes, batch.gt_labels))
        return losses

    def distill_terms(self, out, cache: TeacherBatch, gt_boxes: Sequence[torch.Tensor],
                      gt_labels: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weighted distillation terms of one batch from its teacher records (read from the cache, or computed
        by a live teacher).

        out: the student's `StudentOutput` (bev (B, C_s, H, W) and head maps on the student grid); gt_boxes: B
        tensors (G_i, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame; gt_labels: B tensors (G_i,)
        class indices, needed by a class-aware RD quality when the records have no precomputed `iou`.
        """
        cfg, terms = self.cfg, {}
        scale = cfg.warmup_factor(self.step)
        adapted = self.adapter(out.bev) if self.adapter is not None else None             # (B, C_t, H, W)
        weights = self.cell_weights(cache, gt_boxes) if adapted is not None else None     # (B, H, W) or None
        if adapted is not None and ("cd" in cfg.terms or "mse" in cfg.terms):
            teacher = resample(cache.bev.to(adapted.dtype), self.teacher_grid, self.student.grid)
            if "cd" in cfg.terms:
                f = teacher.permute(0, 2, 3, 1).flatten(0, 2)
                g = adapted.permute(0, 2, 3, 1).flatten(0, 2)
                rows = None if weights is None else weights.flatten()                    # same (b, h, w) order
                terms["loss_cd"] = scale * cfg.alpha_cd * correlation_loss(f, g, cfg.lambda_c, rows)
            if "mse" in cfg.terms:
                terms["loss_mse"] = scale * cfg.alpha_mse * feature_mse(teacher, adapted, weights)
        if adapted is not None and "td" in cfg.terms:
            student_tokens = bev_tokens(adapted, self.tokens)
            # The cell weights pooled like the features: each token's mean weight, in the token order (B, P²).
            token_weights = None if weights is None else bev_tokens(weights[:, None], self.tokens)[..., 0]
            k = cfg.k
            terms["loss_td"] = scale * cfg.alpha_td * temporal_loss(
                self._teacher_tokens(cache.tokens), self._teacher_tokens(cache.past_tokens[:, :k]),
                student_tokens, cache.past_valid[:, :k], tau=cfg.tau, weights=token_weights)
        if "rd" in cfg.terms:
            terms["loss_rd"] = scale * cfg.alpha_rd * self.response_term(out, cache, gt_boxes, gt_labels)
        return terms

    def cell_weights(self, cache: TeacherBatch, gt_boxes: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """(B, H, W) weights of the feature terms on the student grid (`fg_mask`, `fg_background_weight`), or None
        with `fg_mask: none`. Foreground from the GT boxes or from the record's teacher boxes; the Gaussians are
        those of the student head's heatmap targets (its `gaussian_overlap` and `min_radius`)."""
        cfg = self.cfg
        if cfg.fg_mask == "none":
            return None
        target = self.student.head.target_cfg
        overlap, radius = target.gaussian_overlap, target.min_radius
        if cfg.fg_mask == "gt":
            fg = gt_foreground(gt_boxes, self.student.grid, gaussian_overlap=overlap, min_radius=radius)
        else:
            fg = teacher_foreground(cache.boxes, cache.scores, cache.valid.to(cache.boxes.device), self.student.grid,
                                    gaussian_overlap=overlap, min_radius=radius)
        return cell_weights(fg, cfg.fg_background_weight)

    def response_term(self, out, cache: TeacherBatch, gt_boxes: Sequence[torch.Tensor],
                      gt_labels: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """RD, unweighted by alpha: the student's head read at the teacher boxes' centre cells against the boxes,
        in `rd_space`, with the quality of `gamma`, `rd_class_aware` and `rd_drop_flipped`."""
        cfg, head, grid = self.cfg, self.student.head, self.student.grid
        boxes, labels = cache.boxes, cache.labels
        student_codes, cells, student_probs, valid = head.read_codes_at(out.preds, grid, boxes, labels, cache.valid)
        q = quality_weights(boxes, cache.scores, gt_boxes, gamma=cfg.gamma, valid=valid, iou=cache.iou,
                            teacher_labels=labels, gt_labels=gt_labels, match=cfg.gt_match)
        if cfg.rd_space == "encoded":
            # The head's own targets for the teacher boxes, from the cells read: no decode of the student's codes.
            teacher_codes = codes_from_boxes(boxes.float(), cells, grid)
            code_weights = [w * head.loss_cfg.bbox_weight for w in head.target_cfg.code_weights]
        else:
            used = q > 0
            teacher_codes = decoded_codes(boxes, used)
            student_codes = decoded_codes(boxes_from_codes(student_codes, cells, grid), used)
            code_weights = None
        return response_loss(teacher_codes, cache.probs, student_codes, student_probs, q, code_weights)


class DistillStepHook(HookBase):
    """Tells the `Distiller` which optimizer step is about to run, for the warm-up of its weights.

    It reads `trainer.step` (the steps done) in `before_step`; a resumed trainer restores it from the checkpoint
    first, so a resumed run ramps exactly as an uninterrupted one.
    """

    def before_step(self) -> None:
        model = unwrap_model(self.trainer.model)
        if not isinstance(model, Distiller):
            raise ConfigError(f"DistillStepHook needs a Distiller as the trainer's model; got {type(model).__name__}")
        model.step = self.trainer.step
