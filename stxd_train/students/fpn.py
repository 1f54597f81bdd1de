"""Feature pyramid neck for the image backbones, with mmdetection's FPN parameter names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FPN"]


class _ConvModule(nn.Module):
    """A convolution under the attribute `conv`, so that keys read `lateral_convs.0.conv.weight` as in mmcv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Top-down feature pyramid: 1x1 laterals, nearest upsampling and sum, then a 3x3 conv per level.

    Parameters
    ----------
    in_channels : channels of each input level, finest first (e.g. `ResNet.out_channels`).
    out_channels : channels of every output level.
    num_outs : output levels, finest first. Fewer than `len(in_channels)` builds output convs for those levels
        only: the coarser inputs still reach them through the top-down path, and no module computes a map that
        nobody reads (DDP refuses parameters without gradient). More than `len(in_channels)` adds parameter-free
        stride-2 max pools of the coarsest output. Default `len(in_channels)`.
    """

    def __init__(self, *, in_channels: Sequence[int], out_channels: int, num_outs: int | None = None) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        if not self.in_channels or min(self.in_channels) < 1 or out_channels < 1:
            raise ValueError(f"FPN: found in_channels {self.in_channels} and out_channels {out_channels}, "
                             "expected at least one level and positive channel counts")
        self.num_outs = len(self.in_channels) if num_outs is None else num_outs
        if self.num_outs < 1:
            raise ValueError(f"FPN num_outs: found {self.num_outs}, expected at least 1")
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(_ConvModule(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(_ConvModule(out_channels, out_channels, 3)
                                       for _ in range(min(self.num_outs, len(self.in_channels))))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """feats: one (B, in_channels[i], H_i, W_i) map per input level, finest first
        -> `num_outs` maps (B, out_channels, H_i, W_i), extra levels halving the last size (rounded up)."""
        found = tuple(f.shape[1] for f in feats)
        if found != self.in_channels:
            raise ValueError(f"FPN input: found levels with channels {found}, expected {self.in_channels}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals, strict=False)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs
