"""The STXD distillation losses and the d_eff diagnostic, as pure tensor functions.

- `correlation_loss`: CD, the cross-correlation of standardised teacher and student BEV features.
- `temporal_loss`: TD, the KL between student and teacher token-similarity maps against past frames.
- `response_loss`, `quality_weights`, `best_gt_iou` and `GTMatch`: RD, quality-weighted box and class distillation.
- `feature_mse`: the plain (optionally foreground-weighted) MSE baseline.
- `gt_foreground`, `teacher_foreground` and `cell_weights`: per-cell foreground weights of the feature terms.
- `effective_dimension`: the participation ratio of a feature covariance, for diagnosis.

No function keeps state, reads a config or touches the disk; the caller picks the inputs and the weights.
"""

from __future__ import annotations

from stxd_train.distill.correlation import correlation_loss
from stxd_train.distill.diagnostics import effective_dimension
from stxd_train.distill.feature import feature_mse
from stxd_train.distill.foreground import cell_weights, gt_foreground, teacher_foreground
from stxd_train.distill.response import GTMatch, best_gt_iou, quality_weights, response_loss
from stxd_train.distill.temporal import temporal_loss

__all__ = [
    "GTMatch",
    "best_gt_iou",
    "cell_weights",
    "correlation_loss",
    "effective_dimension",
    "feature_mse",
    "gt_foreground",
    "quality_weights",
    "response_loss",
    "teacher_foreground",
    "temporal_loss",
]
