"""The STXD distillation losses and the d_eff diagnostic, as pure tensor functions.

- `correlation_loss`: CD, the cross-correlation of standardised teacher and student BEV features.
- `temporal_loss`: TD, the KL between student and teacher token-similarity maps against past frames.
- `response_loss`, `quality_weights` and `best_gt_iou`: RD, quality-weighted box and class distillation.
- `feature_mse`: the plain (optionally foreground-weighted) MSE baseline.
- `effective_dimension`: the participation ratio of a feature covariance, for diagnosis.

No function keeps state, reads a config or touches the disk; the caller picks the inputs and the weights.
"""

from __future__ import annotations

from stxd_train.distill.correlation import correlation_loss
from stxd_train.distill.diagnostics import effective_dimension
from stxd_train.distill.feature import feature_mse
from stxd_train.distill.response import best_gt_iou, quality_weights, response_loss
from stxd_train.distill.temporal import temporal_loss

__all__ = [
    "best_gt_iou",
    "correlation_loss",
    "effective_dimension",
    "feature_mse",
    "quality_weights",
    "response_loss",
    "temporal_loss",
]
