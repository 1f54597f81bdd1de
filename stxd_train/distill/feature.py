"""The feature-imitation baseline: a plain or foreground-weighted MSE between teacher and student features."""

from __future__ import annotations

import torch
from torch import Tensor

_MASK_EPS = 1e-6


def feature_mse(f: Tensor, g: Tensor, fg_mask: Tensor | None = None) -> Tensor:
    """MSE baseline between teacher features f and student features g of the same shape.

    f, g: (N, D) rows of features, or (B, C, H, W) BEV maps; the channel axis is the last one for 2-D inputs
    and axis 1 otherwise. Without a mask the loss is `mean((f − g)²)` over every element. With
    fg_mask, weights broadcastable to the shape without the channel axis ((N,) for (N, D) inputs,
    (B, H, W) for (B, C, H, W) inputs; bool or float), it is the weighted mean

        Σ_p m_p Σ_c (f_pc − g_pc)² / (max(Σ_p m_p, 1e-6) · D),

    with p the positions and D the number of channels, so a mask of ones gives the plain MSE.
    Returns a scalar. Raises ValueError on a shape mismatch or a mask that does not broadcast.
    """
    if f.shape != g.shape or f.dim() < 2:
        raise ValueError(
            f"feature_mse expects teacher f and student g of equal shape (N, D) or (B, C, H, W); got "
            f"{tuple(f.shape)} and {tuple(g.shape)}"
        )
    sq = (f - g).pow(2)
    if fg_mask is None:
        return sq.mean()
    channel_dim = -1 if f.dim() == 2 else 1
    per_position = sq.sum(dim=channel_dim)
    try:
        weights = torch.broadcast_to(fg_mask.to(dtype=sq.dtype, device=sq.device), per_position.shape)
    except RuntimeError as err:
        raise ValueError(
            f"feature_mse: fg_mask of shape {tuple(fg_mask.shape)} does not broadcast to the positions "
            f"{tuple(per_position.shape)} of features {tuple(f.shape)}"
        ) from err
    channels = f.shape[channel_dim]
    return (weights * per_position).sum() / (weights.sum().clamp_min(_MASK_EPS) * channels)
