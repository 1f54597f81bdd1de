"""RD, the quality-weighted response distillation loss between teacher boxes and the student's dense head.

The loss compares regression codes: the caller picks the space (the head's own codes, or `encode_boxes` of
decoded boxes, the paper's reading) and the per-entry weights, and computes the quality q with
`quality_weights`, whose GT matching is a `GTMatch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, kw_only=True)
class GTMatch:
    """How RD's quality matches a teacher box with the ground truth: the GT box of largest rotated BEV IoU."""

    class_aware: bool = True
    """Only GT boxes of the teacher box's class count. A class-blind IoU rewards a teacher box of the wrong class
    lying on an object (a `car` on a truck), whose class the student would then be taught."""
    drop_flipped: bool = True
    """The IoU is 0 when the heading of the matched GT box is more than 90° from the teacher box's. A box and its
    180° turn have BEV IoU 1, so the IoU alone cannot catch a flipped heading."""


#: The default: same class, flips dropped.
DEFAULT_MATCH = GTMatch()
#: The paper's reading: any GT class, heading not checked.
PAPER_MATCH = GTMatch(class_aware=False, drop_flipped=False)


def _labels(name: str, labels: Any, count: int) -> np.ndarray:
    """`labels` as a (count,) int64 array; ValueError on another length."""
    out = (labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)).reshape(-1)
    if len(out) != count:
        raise ValueError(f"{name} must hold one class index per box, {count}; got {len(out)}")
    return out.astype(np.int64)


def best_gt_iou(teacher_boxes: Any, gt_boxes: Any, teacher_labels: Any = None, gt_labels: Any = None,
                match: GTMatch = DEFAULT_MATCH) -> np.ndarray:
    """(M,) float64: each teacher box's rotated BEV IoU with its matched GT box (0 without one).

    teacher_boxes: (M, 9); gt_boxes: (G, 9), both [x, y, z, w, l, h, yaw, vx, vy] in the same frame; teacher_labels:
    (M,) and gt_labels: (G,) class indices, needed when `match.class_aware`; tensors or arrays. The matched GT box
    is the one of largest IoU (among those of the same class when `match.class_aware`); with `match.drop_flipped`
    the IoU is 0 when its heading differs from the teacher box's by more than 90° (wrapped to [−180°, 180°)).
    The IoU part of `quality_weights`, for callers that compute it once per sample (e.g. a DataLoader worker)
    and pass it as `iou`. Raises ValueError when class-aware matching lacks the labels.
    """
    boxes, gt = _to_numpy(teacher_boxes).reshape(-1, 9), _to_numpy(gt_boxes).reshape(-1, 9)
    if match.class_aware and (teacher_labels is None or gt_labels is None):
        raise ValueError("class-aware GT matching needs teacher_labels and gt_labels; pass them, or match="
                         "GTMatch(class_aware=False) to match any class")
    if not len(boxes) or not len(gt):
        return np.zeros(len(boxes))
    iou = bev_iou(boxes, gt)                                                              # (M, G)
    if match.class_aware:
        same = _labels("teacher_labels", teacher_labels, len(boxes))[:, None] == _labels("gt_labels", gt_labels,
                                                                                         len(gt))[None, :]
        iou = np.where(same, iou, 0.0)
    best = iou.argmax(axis=1)
    out = iou[np.arange(len(boxes)), best]
    if match.drop_flipped:
        gap = np.mod(boxes[:, 6] - gt[best, 6] + math.pi, 2.0 * math.pi) - math.pi
        out = np.where(np.abs(gap) > math.pi / 2.0, 0.0, out)
    return out


def quality_weights(
    teacher_boxes: Tensor,
    teacher_scores: Tensor,
    gt_boxes: Sequence[Any],
    gamma: float = 0.5,
    valid: Tensor | None = None,
    iou: Tensor | None = None,
    *,
    teacher_labels: Tensor | None = None,
    gt_labels: Sequence[Any] | None = None,
    match: GTMatch = DEFAULT_MATCH,
) -> Tensor:
    """Quality q of each teacher box: high when the teacher is both confident and right.

    teacher_boxes: (B, M, 9) [x, y, z, w, l, h, yaw, vx, vy] in the LiDAR frame; teacher_scores: (B, M) in
    [0, 1]; gt_boxes: B tensors (or arrays) of shape (G_i, 9), the ground truth of each sample, G_i may be 0;
    valid: (B, M) bool, False for padding slots (None = all valid); iou: (B, M) `best_gt_iou` of the boxes when
    already computed (then `gt_boxes`, the labels and `match` are not read); teacher_labels: (B, M) and gt_labels:
    B tensors (G_i,), class indices, needed for class-aware matching; match: see `GTMatch`.

    For teacher box i of sample b, IoU_i is the exact rotated bird's-eye-view IoU (`pipelines.boxes.bev_iou`, on
    detached CPU float64 copies) with its matched GT box of sample b (`best_gt_iou`), 0 without one. The quality
    is the geometric blend

        q_i = c_i^(1−γ) · IoU_i^γ,

    as in TOOD's task-alignment metric: γ = 0 gives the teacher score c_i alone, γ = 1 the IoU alone and the
    default γ = 0.5 weighs both equally. Scores are clamped to [0, 1] first. q is 0 where `valid` is False.

    Returns q: (B, M), detached, on teacher_scores' device and dtype. Raises ValueError on bad shapes, a γ
    outside [0, 1], or class-aware matching without labels.
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
        if teacher_labels is not None and tuple(teacher_labels.shape) != shape:
            raise ValueError(f"teacher_labels must have the shape (B, M) = {shape}; got {tuple(teacher_labels.shape)}")
        if gt_labels is not None and len(gt_labels) != shape[0]:
            raise ValueError(f"gt_labels must hold one (G,) label set per sample, B = {shape[0]}; got {len(gt_labels)}")
        best = np.zeros(shape, dtype=np.float64)
        for b, gt in enumerate(gt_boxes):
            rows = np.flatnonzero(mask[b])
            labels = None if teacher_labels is None else teacher_labels[b, rows]
            best[b, rows] = best_gt_iou(teacher_boxes[b, rows], gt, labels,
                                        None if gt_labels is None else gt_labels[b], match)
    scores = teacher_scores.detach().to(device="cpu", dtype=torch.float64)
    scores = torch.where(torch.from_numpy(mask), scores, torch.zeros_like(scores)).clamp(0.0, 1.0)
    q = scores.pow(1.0 - gamma) * torch.from_numpy(best).pow(gamma)
    q = torch.where(torch.from_numpy(mask), q, torch.zeros_like(q))
    return q.to(device=teacher_scores.device, dtype=teacher_scores.dtype)


def decoded_codes(boxes: Tensor, used: Tensor) -> Tensor:
    """The paper's regression space: `encode_boxes` of decoded boxes (B, M, 9) → (B, M, 10) [x, y, z (metres),
    log w, log l, log h, sin yaw, cos yaw, vx, vy], with a placeholder box where `used: (B, M)` is False so that
    log-sizes stay finite in the value and the gradient whatever those slots hold."""
    _check_boxes("boxes", boxes)
    safe = torch.tensor(_SAFE_BOX, dtype=boxes.dtype, device=boxes.device)
    return encode_boxes(torch.where(used.to(boxes.device)[..., None], boxes, safe))


def response_loss(
    teacher_codes: Tensor,
    teacher_probs: Tensor,
    student_codes: Tensor,
    student_probs: Tensor,
    q: Tensor,
    code_weights: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """RD loss: the student's prediction at each teacher box should match it, weighted by the box's quality.

    teacher_codes, student_codes: (B, M, D) regression codes of each teacher box and of the student's prediction
    read at the box's centre cell (the caller does the reading, which is the matching π), in one space: the
    head's codes (`CenterHead.read_codes_at` and `codes_from_boxes`: [dx, dy in cells, z, log w, log l, log h,
    sin, cos, vx, vy], the space of the head's box loss) or `decoded_codes` (the paper's reading);
    teacher_probs, student_probs: (B, M, C) per-class probabilities in [0, 1]; q: (B, M) the qualities
    (`quality_weights`), ≥ 0; code_weights: (D,) weights of the code entries (None = ones), e.g. the head's
    `code_weights` × its `bbox_weight`, so that RD weighs each entry as the detection loss does.

    With w = code_weights and p = teacher, s = student probabilities clamped to [1e-6, 1 − 1e-6]:

        L1_i = Σ_e w_e |s̃_ie − t_ie|,
        KL_i = Σ_c p_ic log(p_ic / s_ic) + (1 − p_ic) log((1 − p_ic) / (1 − s_ic)),
        L_RD = Σ_i q_i (L1_i + KL_i) / max(Σ_i q_i, 1e-6).

    Teacher inputs and q are detached: gradients reach only student_codes and student_probs, and boxes with
    q = 0 contribute neither value nor gradient, whatever they hold (NaN included). Returns a scalar, 0 with a
    gradient path when Σq = 0. Raises ValueError on inconsistent shapes.
    """
    if teacher_codes.dim() != 3 or student_codes.shape != teacher_codes.shape:
        raise ValueError(f"teacher_codes and student_codes must have one shape (B, M, D); got "
                         f"{tuple(teacher_codes.shape)} and {tuple(student_codes.shape)}")
    shape, dim = tuple(teacher_codes.shape[:2]), teacher_codes.shape[2]
    if teacher_probs.dim() != 3 or tuple(teacher_probs.shape[:2]) != shape:
        raise ValueError(f"teacher_probs must have the shape (B, M, C) with (B, M) = {shape}; got "
                         f"{tuple(teacher_probs.shape)}")
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"student_probs must match teacher_probs {tuple(teacher_probs.shape)}; got "
                         f"{tuple(student_probs.shape)}")
    if tuple(q.shape) != shape:
        raise ValueError(f"q must have the shape (B, M) = {shape}; got {tuple(q.shape)}")
    weights = (torch.ones(dim) if code_weights is None
               else torch.as_tensor(code_weights, dtype=student_codes.dtype).reshape(-1))
    if len(weights) != dim:
        raise ValueError(f"code_weights must hold one weight per code entry, {dim}; got {len(weights)}")
    weights = weights.to(device=student_codes.device, dtype=student_codes.dtype)
    q = q.detach().to(device=student_codes.device, dtype=student_codes.dtype)
    used = q > 0
    box_used = used[..., None]
    # Select before any arithmetic: unused slots may hold NaN or -inf (log of a padding box's size 0).
    t = torch.where(box_used, teacher_codes.detach().to(student_codes), torch.zeros_like(student_codes))
    s = torch.where(box_used, student_codes, torch.zeros_like(student_codes))
    l1 = ((s - t).abs() * weights).sum(dim=-1)
    half = torch.full_like(student_probs, 0.5)
    p = torch.where(box_used, teacher_probs.detach().to(student_probs), half).clamp(_PROB_EPS, 1.0 - _PROB_EPS)
    s_prob = torch.where(box_used, student_probs, half).clamp(_PROB_EPS, 1.0 - _PROB_EPS)
    kl = (p * (p.log() - s_prob.log()) + (1.0 - p) * ((1.0 - p).log() - (1.0 - s_prob).log())).sum(dim=-1)
    per_box = torch.where(used, l1 + kl.to(l1), torch.zeros_like(l1))
    return (q * per_box).sum() / q.sum().clamp_min(_WEIGHT_EPS)
