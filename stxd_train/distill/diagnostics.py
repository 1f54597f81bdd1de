"""Feature diagnostics: the effective dimension (d_eff) used to measure information collapse."""

from __future__ import annotations

import torch
from torch import Tensor


def effective_dimension(x: Tensor) -> float:
    """Participation ratio of the covariance spectrum of features x: how many directions they really use.

    x: (N, D) with the rows as samples (BEV positions) and the columns as feature dimensions. The columns
    are centred, the covariance is `Σ = x̂ᵀ x̂ / (N − 1)` (D, D), its eigenvalues λ come from
    `torch.linalg.eigvalsh` in float64 with negative round-off clamped to 0, and

        d_eff = (Σ_i λ_i)² / Σ_i λ_i².

    It ranges from 1 (all variance along one direction) to D (isotropic features); an all-zero (or
    constant) input gives 0.0. Gradients are not tracked. Raises ValueError for a non-2-D x or N < 2.
    """
    if x.dim() != 2:
        raise ValueError(f"effective_dimension expects features of shape (N, D); got {tuple(x.shape)}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"effective_dimension needs at least 2 rows to estimate a covariance; got N={n}")
    with torch.no_grad():
        x64 = x.detach().to(torch.float64)
        centred = x64 - x64.mean(dim=0, keepdim=True)
        eig = torch.linalg.eigvalsh(centred.T @ centred / (n - 1)).clamp_min(0.0)
        total_sq = float(eig.pow(2).sum())
        if total_sq == 0.0:
            return 0.0
        return float(eig.sum()) ** 2 / total_sq
