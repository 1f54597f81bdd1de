"""RD, the quality-weighted response distillation loss between teacher boxes and the student's dense head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipelines.boxes import bev_iou, encode_boxes

_PROB_EPS = 1e-6
_WEIGHT_EPS = 1e-6
# Stands in for boxes that carry no weight, so that log-sizes stay finite in the value and the gradient.
_SAFE_BOX = (0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0)


def _check_boxes(name: str, boxes: Tensor, shape: tuple[int, int] | None = None) -> None:
    """Raise ValueError unless `boxes` is (B, M, 9), and (B, M) equals `shape` when given."""
    if boxes.dim() != 3 or boxes.shape[-1] != 9 or (shape is not None and tuple(boxes.shape[:2]) != shape):
        expected = "(B, M, 9)" if shape is None else f"(B, M, 9) = ({shape[0]}, {shape[1]}, 9)"
        raise ValueError(
            f"{name} must have the shape {expected} [x, y, z, w, l, h, yaw, vx, vy]; got {tuple(boxes.shape)}"
        )


def _valid_mask(valid: Tensor | None, shape: tuple[int, int], device: torch.device) -> Tensor:
    """`valid: (B, M)` as a bool tensor on `device`; all True when None."""
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(valid.shape) != shape:
        raise ValueError(f"valid must have the shape (B, M) = {shape}; got {tuple(valid.shape)}")
    return valid.to(device=device, dtype=torch.bool)


def _to_numpy(boxes: Any) -> np.ndarray:
    """A (G, 9) box tensor or array as CPU float64 numpy."""
    if isinstance(boxes, Tensor):
        return boxes.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(boxes, dtype=np.float64)


def best_gt_iou(teacher_boxes: Any, gt_boxes: Any) -> np.ndarray:
    """(M,) float64: each teacher box's largest rotated BEV IoU with any GT box (0 without GT).

    teacher_boxes: (M, 9); gt_boxes: (G, 9); tensors or arrays. The IoU part of `quality_weights`, for callers
    that compute it once per sample (e.g. a DataLoader worker) and pass it as `iou`.
    """
    boxes, gt = _to_numpy(teacher_boxes).reshape(-1, 9), _to_numpy(gt_boxes).reshape(-1, 9)
    if not len(boxes) or not len(gt):
        return np.zeros(len(boxes))
    return bev_iou(boxes, gt).max(axis=1)


def quality_weights(
    teacher_boxes: Tensor,
    teacher_scores: Tensor,
    gt_boxes: Sequence[Any],
    gamma: float = 0.5,
    valid: Tensor | None = None,
    iou: Tensor | None = None,
) -> Tensor:
    """Quality q of each teacher box: high when the teacher is both confident and right.

    teacher_boxes: (B, M, 9) [x, y, z, w, l, h, yaw, vx, vy] in the LiDAR frame; teacher_scores: (B, M) in
    [0, 1]; gt_boxes: B tensors (or arrays) of shape (G_i, 9), the ground truth of each sample, G_i may be 0;
    valid: (B, M) bool, False for padding slots (None = all valid); iou: (B, M) `best_gt_iou` of the boxes when
    already computed (then `gt_boxes` is not read).

    For teacher box i of sample b, IoU_i = max_g IoU_BEV(b_i, gt_g) over the GT boxes of sample b, the exact
    rotated bird's-eye-view IoU of `pipelines.boxes.bev_iou` (on detached CPU float64 copies), and 0 when the
    sample has no GT. The quality is the geometric blend

        q_i = c_i^(1−γ) · IoU_i^γ,

    as in TOOD's task-alignment metric: γ = 0 gives the teacher score c_i alone, γ = 1 the IoU alone and the
    default γ = 0.5 weighs both equally. Scores are clamped to [0, 1] first. q is 0 where `valid` is False.

    Returns q: (B, M), detached, on teacher_scores' device and dtype. Raises ValueError on bad shapes or a
    γ outside [0, 1].
    """
    _check_boxes("teacher_boxes", teacher_boxes)
    shape = (teacher_boxes.shape[0], teacher_boxes.shape[1])
    if tuple(teacher_scores.shape) != shape:
        raise ValueError(f"teacher_scores must have the shape (B, M) = {shape}; got {tuple(teacher_scores.shape)}")
    if len(gt_boxes) != shape[0]:
        raise ValueError(f"gt_boxes must hold one (G, 9) box set per sample, B = {shape[0]}; got {len(gt_boxes)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1]; got {gamma}")
    mask = _valid_mask(valid, shape, torch.device("cpu")).numpy()
    if iou is not None:
        if tuple(iou.shape) != shape:
            raise ValueError(f"iou must have the shape (B, M) = {shape}; got {tuple(iou.shape)}")
        best = iou.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        best = np.zeros(shape, dtype=np.float64)
        for b, gt in enumerate(gt_boxes):
            rows = np.flatnonzero(mask[b])
            best[b, rows] = best_gt_iou(teacher_boxes[b, rows], gt)
    scores = teacher_scores.detach().to(device="cpu", dtype=torch.float64)
    scores = torch.where(torch.from_numpy(mask), scores, torch.zeros_like(scores)).clamp(0.0, 1.0)
    q = scores.pow(1.0 - gamma) * torch.from_numpy(best).pow(gamma)
    q = torch.where(torch.from_numpy(mask), q, torch.zeros_like(q))
    return q.to(device=teacher_scores.device, dtype=teacher_scores.dtype)


def response_loss(
    teacher_boxes: Tensor,
    teacher_probs: Tensor,
    teacher_scores: Tensor,
    gt_boxes: Sequence[Any],
    student_boxes: Tensor,
    student_probs: Tensor,
    gamma: float = 0.5,
    valid: Tensor | None = None,
    iou: Tensor | None = None,
) -> Tensor:
    """RD loss: the student's prediction at each teacher box should match it, weighted by the box's quality.

    teacher_boxes: (B, M, 9) [x, y, z, w, l, h, yaw, vx, vy]; teacher_probs: (B, M, C) per-class
    probabilities in [0, 1]; teacher_scores: (B, M); gt_boxes: B tensors of shape (G_i, 9);
    student_boxes: (B, M, 9) the student's decoded boxes read at each teacher box's centre cell (the
    caller does the reading, which is the matching π); student_probs: (B, M, C) the student's class
    probabilities read there; valid: (B, M) bool, None = all valid; iou: precomputed `best_gt_iou` (B, M), see
    `quality_weights`. Sizes must be positive where q > 0.

    With q from `quality_weights` (q_i = c_i^(1−γ) · IoU_i^γ), enc = `pipelines.boxes.encode_boxes`
    (x, y, z, log w, log l, log h, sin yaw, cos yaw, vx, vy), p = teacher and s = student probabilities
    clamped to [1e-6, 1 − 1e-6]:

        L1_i = Σ_e |enc(b̃_i)_e − enc(b_i)_e|,
        KL_i = Σ_c p_ic log(p_ic / s_ic) + (1 − p_ic) log((1 − p_ic) / (1 − s_ic)),
        L_RD = Σ_i q_i (L1_i + KL_i) / max(Σ_i q_i, 1e-6).

    Teacher inputs are detached: gradients reach only student_boxes and student_probs, and boxes with q = 0
    (score 0, no GT overlap, invalid) contribute neither value nor gradient, whatever they hold. Returns a
    scalar, 0 with a gradient path when Σq = 0. Raises ValueError on inconsistent shapes.
    """
    _check_boxes("teacher_boxes", teacher_boxes)
    shape = (teacher_boxes.shape[0], teacher_boxes.shape[1])
    _check_boxes("student_boxes", student_boxes, shape)
    if teacher_probs.dim() != 3 or tuple(teacher_probs.shape[:2]) != shape:
        raise ValueError(f"teacher_probs must have the shape (B, M, C) with (B, M) = {shape}; got "
                         f"{tuple(teacher_probs.shape)}")
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"student_probs must match teacher_probs {tuple(teacher_probs.shape)}; got "
                         f"{tuple(student_probs.shape)}")
    teacher_boxes, teacher_probs = teacher_boxes.detach(), teacher_probs.detach()
    q = quality_weights(teacher_boxes, teacher_scores.detach(), gt_boxes, gamma=gamma, valid=valid, iou=iou)
    q = q.to(device=student_boxes.device, dtype=student_boxes.dtype)
    used = q > 0
    safe = torch.tensor(_SAFE_BOX, dtype=student_boxes.dtype, device=student_boxes.device)
    box_used = used[..., None]
    t_box = torch.where(box_used, teacher_boxes.to(student_boxes), safe)
    s_box = torch.where(box_used, student_boxes, safe)
    l1 = (encode_boxes(s_box) - encode_boxes(t_box)).abs().sum(dim=-1)
    half = torch.full_like(student_probs, 0.5)
    p = torch.where(box_used, teacher_probs.to(student_probs), half).clamp(_PROB_EPS, 1.0 - _PROB_EPS)
    s = torch.where(box_used, student_probs, half).clamp(_PROB_EPS, 1.0 - _PROB_EPS)
    kl = (p * (p.log() - s.log()) + (1.0 - p) * ((1.0 - p).log() - (1.0 - s).log())).sum(dim=-1)
    per_box = torch.where(used, l1 + kl.to(l1), torch.zeros_like(l1))
    return (q * per_box).sum() / q.sum().clamp_min(_WEIGHT_EPS)
