"""CD, the correlation-regularising distillation loss between teacher and student BEV features."""

from __future__ import annotations

import torch
from torch import Tensor

_STD_EPS = 1e-6


def _standardise(x: Tensor, w: Tensor | None) -> Tensor:
    """Columns of `x: (N, D)` with mean 0 and biased std 1: `(x − mean) / (std + 1e-6)`; with row weights
    `w: (N, 1)` summing to 1, the weighted mean and variance."""
    mean = x.mean(dim=0, keepdim=True) if w is None else (w * x).sum(dim=0, keepdim=True)
    centred = x - mean
    var = centred.pow(2).mean(dim=0, keepdim=True) if w is None else (w * centred.pow(2)).sum(dim=0, keepdim=True)
    # A constant column (a dead channel) has var 0, where sqrt's gradient is infinite: keep it out of autograd.
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    return centred / (std + _STD_EPS)


def correlation_loss(f: Tensor, g: Tensor, lambda_c: float, weights: Tensor | None = None) -> Tensor:
    """CD loss: pull matched feature dimensions together and keep different ones decorrelated.

    f: (N, D) teacher features; g: (N, D) student features already adapted to the teacher's D channels.
    The rows are BEV positions (batch × H × W, flattened) and the columns are feature dimensions.
    weights: (N,) ≥ 0 per row (e.g. a foreground map flattened in the same order), None for equal weights.

    With the normalised weights ŵ = w / Σw (1/N without weights), each column is standardised over the rows with
    the weighted mean and biased variance, `x̂ = (x − Σ ŵ x) / (std + 1e-6)`, and the cross-correlation is
    `C = f̂ᵀ diag(ŵ) ĝ` (D, D), i.e. `f̂ᵀ ĝ / N` without weights. The loss is

        L_CD = Σ_i (1 − C_ii)² + λ_c Σ_i Σ_{j≠i} C_ij².

    The diagonal term aligns dimension i of the student with dimension i of the teacher; the off-diagonal
    term, weighted by `lambda_c`, penalises redundant (collapsed) dimensions. The weights make both the statistics
    and the correlations those of the weighted rows (e.g. the foreground), not only the sum. Swapping f and g
    transposes C, so the value is symmetric in its two arguments; the roles only matter for which input the caller
    lets gradients reach (normally g alone: the teacher is frozen). Returns a scalar in f's dtype; 0, with a
    gradient path to g, when all weights are 0.

    Raises ValueError when f and g are not 2-D with equal shapes, when N < 2, or on weights of another length or
    with a negative or non-finite entry.
    """
    if f.dim() != 2 or g.dim() != 2 or f.shape != g.shape:
        raise ValueError(
            f"correlation_loss expects teacher f and student g of equal shape (N, D); got f {tuple(f.shape)} and "
            f"g {tuple(g.shape)}; flatten the BEV maps to (B·H·W, D) and adapt the student to the teacher's D first"
        )
    n, d = f.shape
    if n < 2:
        raise ValueError(f"correlation_loss needs at least 2 rows (BEV positions) to standardise; got N={n}")
    w = None
    if weights is not None:
        if tuple(weights.shape) != (n,):
            raise ValueError(f"correlation_loss expects one weight per row, ({n},); got {tuple(weights.shape)}")
        w = weights.detach().to(device=f.device, dtype=f.dtype)
        if not (torch.isfinite(w).all() and (w >= 0).all()):
            raise ValueError("correlation_loss expects finite weights >= 0")
        total = w.sum()
        if total <= 0:
            return (g * 0).sum()
        w = (w / total)[:, None]
    f_hat = _standardise(f, w)
    c = (f_hat.T @ _standardise(g, w) / n) if w is None else ((f_hat * w).T @ _standardise(g, w))
    diag = torch.diagonal(c)
    off_diag = c.pow(2).masked_fill(torch.eye(d, dtype=torch.bool, device=c.device), 0.0)
    return (1.0 - diag).pow(2).sum() + lambda_c * off_diag.sum()
