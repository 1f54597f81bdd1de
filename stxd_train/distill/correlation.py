"""CD, the correlation-regularising distillation loss between teacher and student BEV features."""

from __future__ import annotations

import torch
from torch import Tensor

_STD_EPS = 1e-6


def _standardise(x: Tensor) -> Tensor:
    """Columns of `x: (N, D)` with mean 0 and biased std 1: `(x − mean) / (std + 1e-6)`."""
    centred = x - x.mean(dim=0, keepdim=True)
    var = centred.pow(2).mean(dim=0, keepdim=True)
    # A constant column (a dead channel) has var 0, where sqrt's gradient is infinite: keep it out of autograd.
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    return centred / (std + _STD_EPS)


def correlation_loss(f: Tensor, g: Tensor, lambda_c: float) -> Tensor:
    """CD loss: pull matched feature dimensions together and keep different ones decorrelated.

    f: (N, D) teacher features; g: (N, D) student features already adapted to the teacher's D channels.
    The rows are BEV positions (batch × H × W, flattened) and the columns are feature dimensions.

    Each column is standardised over the N rows, `x̂ = (x − mean) / (std + 1e-6)` with the biased std, and
    the cross-correlation is `C = f̂ᵀ ĝ / N` (D, D). The loss is

        L_CD = Σ_i (1 − C_ii)² + λ_c Σ_i Σ_{j≠i} C_ij².

    The diagonal term aligns dimension i of the student with dimension i of the teacher; the off-diagonal
    term, weighted by `lambda_c`, penalises redundant (collapsed) dimensions. Swapping f and g transposes
    C, so the value is symmetric in its two arguments; the roles only matter for which input the caller
    lets gradients reach (normally g alone: the teacher is frozen). Returns a scalar in f's dtype.

    Raises ValueError when f and g are not 2-D with equal shapes, or when N < 2.
    """
    if f.dim() != 2 or g.dim() != 2 or f.shape != g.shape:
        raise ValueError(
            f"correlation_loss expects teacher f and student g of equal shape (N, D); got f {tuple(f.shape)} and "
            f"g {tuple(g.shape)}; flatten the BEV maps to (B·H·W, D) and adapt the student to the teacher's D first"
        )
    n, d = f.shape
    if n < 2:
        raise ValueError(f"correlation_loss needs at least 2 rows (BEV positions) to standardise; got N={n}")
    c = _standardise(f).T @ _standardise(g) / n
    diag = torch.diagonal(c)
    off_diag = c.pow(2).masked_fill(torch.eye(d, dtype=torch.bool, device=c.device), 0.0)
    return (1.0 - diag).pow(2).sum() + lambda_c * off_diag.sum()
