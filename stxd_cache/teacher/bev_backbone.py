"""The dense BEV stages of the teacher: the SECOND backbone and the SECONDFPN neck (mmdet3d names)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# mmdet3d's SECOND / SECONDFPN norm settings.
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class SECOND(nn.Module):
    """Blocks of 3x3 conv / BN / ReLU; each block starts with a strided conv. Attribute `blocks[i]` is an
    `nn.Sequential` (conv, bn, relu, conv, bn, relu, ...), as in mmdet3d."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: Sequence[int],
        layer_nums: Sequence[int],
        layer_strides: Sequence[int],
    ) -> None:
        """
        Args:
            in_channels: channels of the input BEV map.
            out_channels: channels of each block.
            layer_nums: 3x3 convs after each block's strided conv.
            layer_strides: stride of each block's first conv.
        """
        super().__init__()
        if not len(out_channels) == len(layer_nums) == len(layer_strides):
            raise ValueError(f"SECOND needs one entry per block, got out_channels {out_channels}, layer_nums "
                             f"{layer_nums}, layer_strides {layer_strides}")
        self.out_channels = tuple(out_channels)
        self.strides = tuple(math.prod(layer_strides[: i + 1]) for i in range(len(layer_strides)))
        blocks = []
        channels = in_channels
        for out, num, stride in zip(out_channels, layer_nums, layer_strides, strict=True):
            layers: list[nn.Module] = [nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False),
                                       _bn(out), nn.ReLU(inplace=True)]
            for _ in range(num):
                layers += [nn.Conv2d(out, out, 3, padding=1, bias=False), _bn(out), nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers))
            channels = out
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, C_in, H, W). Returns one map per block, (B, out_channels[i], H / strides[i], W / strides[i])."""
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return tuple(outs)


class SECONDFPN(nn.Module):
    """Brings every backbone block to one stride and concatenates them. Attribute `deblocks[i]` is an
    `nn.Sequential` (up, bn, relu) where up is a ConvTranspose2d for strides > 1 and a Conv2d with kernel =
    stride = 1 / s otherwise (mmdet3d's `use_conv_for_no_stride=True`, so stride 1 is a 1x1 Conv2d)."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        upsample_strides: Sequence[float],
    ) -> None:
        """
        Args:
            in_channels: channels of each backbone block.
            out_channels: channels of each branch; the output has their sum.
            upsample_strides: per branch, the upsampling factor (e.g. 2), 1, or a downsampling factor's inverse
                (0.5).
        """
        super().__init__()
        if not len(in_channels) == len(out_channels) == len(upsample_strides):
            raise ValueError(f"SECONDFPN needs one entry per branch, got in_channels {in_channels}, out_channels "
                             f"{out_channels}, upsample_strides {upsample_strides}")
        deblocks = []
        for cin, cout, stride in zip(in_channels, out_channels, upsample_strides, strict=True):
            if stride > 1:
                k = round(stride)
                up: nn.Module = nn.ConvTranspose2d(cin, cout, k, stride=k, bias=False)
            else:
                k = round(1 / stride)
                up = nn.Conv2d(cin, cout, k, stride=k, bias=False)
            deblocks.append(nn.Sequential(up, _bn(cout), nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(deblocks)
        self.out_channels = sum(out_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """feats: one (B, in_channels[i], H_i, W_i) map per branch. Returns (B, sum(out_channels), H, W)."""
        if len(feats) != len(self.deblocks):
            raise ValueError(f"SECONDFPN got {len(feats)} maps, expected {len(self.deblocks)}")
        return torch.cat([deblock(f) for deblock, f in zip(self.deblocks, feats, strict=True)], dim=1)
