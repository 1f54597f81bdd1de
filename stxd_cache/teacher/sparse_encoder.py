"""The SECOND-style sparse 3D encoder and its height compression into a dense BEV map.

Submodules are named as in mmdet3d's `SparseEncoder` (`conv_input.0`, `encoder_layers.encoder_layer{i}.{j}.0`
for conv / BatchNorm1d / ReLU triples, `encoder_layers.encoder_layer{i}.{j}.conv1` for residual blocks,
`conv_out.0`) so that importing an mmdet3d checkpoint is a prefix mapping.

**Convolution algorithm.** spconv 2's default algorithm (implicit GEMM) only runs on CUDA and asserts
otherwise; on CPU only `ConvAlgo.Native` works. The algorithm is fixed per layer at construction (layers that
share an `indice_key` must agree), so it is chosen at build time from the target device by `conv_algo`.
Weights are stored in the same (out, k, k, k, in) layout for every algorithm (`ALL_WEIGHT_IS_KRSC`), so a
state dict moves freely between a CPU-built and a CUDA-built encoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

with warnings.catch_warnings():
    # spconv 2.3.6 uses `torch.cuda.amp.custom_fwd` (deprecated since torch 2.4) and its build helper
    # `locale.getdefaultlocale`: warnings about spconv's code, not ours.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import spconv.pytorch as spconv
    from spconv.pytorch import ConvAlgo

# mmdet3d's SparseEncoder norm settings.
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01
Padding = int | Sequence[int]


def conv_algo(device: torch.device | str) -> ConvAlgo | None:
    """The spconv algorithm for layers that will run on `device`: Native on CPU, spconv's default on CUDA."""
    return ConvAlgo.Native if torch.device(device).type == "cpu" else None


def _triple(v: Padding) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else (int(v[0]), int(v[1]), int(v[2]))


def _conv_out_size(size: Sequence[int], kernel: Padding, stride: Padding, padding: Padding) -> tuple[int, ...]:
    k, s, p = _triple(kernel), _triple(stride), _triple(padding)
    return tuple((n + 2 * p[i] - k[i]) // s[i] + 1 for i, n in enumerate(size))


def _block(
    conv: type[spconv.SubMConv3d] | type[spconv.SparseConv3d],
    in_channels: int,
    out_channels: int,
    *,
    kernel: Padding,
    indice_key: str,
    algo: ConvAlgo | None,
    stride: Padding = 1,
    padding: Padding = 0,
) -> spconv.SparseSequential:
    layer = conv(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False,
                 indice_key=indice_key, algo=algo)
    norm = nn.BatchNorm1d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
    return spconv.SparseSequential(layer, norm, nn.ReLU(inplace=True))


class SparseBasicBlock(spconv.SparseModule):
    """Residual pair of submanifold convs (mmdet3d `SparseBasicBlock` names: conv1, bn1, conv2, bn2)."""

    def __init__(self, *, channels: int, indice_key: str, algo: ConvAlgo | None) -> None:
        super().__init__()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.bn1 = nn.BatchNorm1d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.bn2 = nn.BatchNorm1d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.relu = nn.ReLU()

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        """x: sparse (B, C, Z, Y, X). Returns the same sites with new features."""
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(self.relu(self.bn2(out.features) + x.features))


class SparseEncoder(nn.Module):
    """Sparse 3D convolutions over the voxel grid, then the heights stacked into channels.

    Two stage layouts, as mmdet3d's `block_type`:

    - `conv_module`: stage 1 is submanifold blocks; every later stage starts with a stride-2 `SparseConv3d`
      (padding from `encoder_paddings`) followed by submanifold conv / BN / ReLU blocks.
    - `basicblock` (CenterPoint on nuScenes): every block is a residual `SparseBasicBlock` (so it keeps its
      channel count), except the last block of every stage but the last, a stride-2 `SparseConv3d`.

    Submanifold layers of one resolution share an `indice_key` (their indices are the input's, so sharing
    is exact). `conv_out` halves z once more with a (3, 1, 1) kernel.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        sparse_shape: Sequence[int],
        base_channels: int,
        encoder_channels: Sequence[Sequence[int]],
        encoder_paddings: Sequence[Sequence[Padding]],
        output_channels: int,
        block_type: Literal["conv_module", "basicblock"],
        algo: ConvAlgo | None,
    ) -> None:
        """
        Args:
            in_channels: voxel feature channels (5 for the mean VFE of nuScenes points).
            sparse_shape: (Z, Y, X) of the input sparse tensor.
            base_channels: channels of `conv_input`.
            encoder_channels: output channels of every block, one sequence per stage.
            encoder_paddings: padding of every block, same nesting; only strided blocks use it.
            output_channels: channels of `conv_out`.
            block_type: `conv_module` or `basicblock` (see the class doc).
            algo: spconv algorithm of every layer, from `conv_algo(device)`.
        """
        super().__init__()
        if block_type not in ("conv_module", "basicblock"):
            raise ValueError(f"block_type is {block_type!r}; expected 'conv_module' or 'basicblock'")
        self.sparse_shape = tuple(int(v) for v in sparse_shape)
        self.output_channels = output_channels
        self.conv_input = _block(spconv.SubMConv3d, in_channels, base_channels, kernel=3, padding=1,
                                 indice_key="subm1", algo=algo)
        shape: tuple[int, ...] = self.sparse_shape
        channels, last_stage = base_channels, len(encoder_channels) - 1
        self.encoder_layers = spconv.SparseSequential()
        for i, (stage_channels, stage_paddings) in enumerate(zip(encoder_channels, encoder_paddings, strict=True)):
            blocks: list[nn.Module] = []
            for j, (out, pad) in enumerate(zip(stage_channels, stage_paddings, strict=True)):
                if block_type == "conv_module":
                    strided = i > 0 and j == 0
                else:
                    strided = j == len(stage_channels) - 1 and i != last_stage
                if strided:
                    blocks.append(_block(spconv.SparseConv3d, channels, out, kernel=3, stride=2, padding=pad,
                                         indice_key=f"spconv{i + 1}", algo=algo))
                    shape = _conv_out_size(shape, 3, 2, pad)
                elif block_type == "conv_module":
                    blocks.append(_block(spconv.SubMConv3d, channels, out, kernel=3, padding=pad,
                                         indice_key=f"subm{i + 1}", algo=algo))
                elif channels == out:
                    blocks.append(SparseBasicBlock(channels=out, indice_key=f"subm{i + 1}", algo=algo))
                else:
                    raise ValueError(f"encoder stage {i + 1} block {j + 1} is a residual basic block from "
                                     f"{channels} to {out} channels; basic blocks keep their channel count")
                channels = out
            self.encoder_layers.add_module(f"encoder_layer{i + 1}", spconv.SparseSequential(*blocks))
        self.conv_out = _block(spconv.SparseConv3d, channels, output_channels, kernel=(3, 1, 1), stride=(2, 1, 1),
                               padding=0, indice_key="spconv_down2", algo=algo)
        self.out_shape: tuple[int, int, int] = _conv_out_size(shape, (3, 1, 1), (2, 1, 1), 0)  # type: ignore[assignment]
        if min(self.out_shape) < 1:
            raise ValueError(f"sparse shape {self.sparse_shape} shrinks to {self.out_shape} in the encoder; "
                             "expected at least one voxel per axis: use fewer stages or a larger range")

    @property
    def out_channels(self) -> int:
        """Channels of the BEV map: `output_channels` × the remaining heights."""
        return self.output_channels * self.out_shape[0]

    @property
    def bev_shape(self) -> tuple[int, int]:
        """(H, W) of the BEV map."""
        return self.out_shape[1], self.out_shape[2]

    def forward(self, voxels: spconv.SparseConvTensor) -> torch.Tensor:
        """voxels: sparse (B, F, Z, Y, X) with `sparse_shape`. Returns the BEV map (B, C * D, H, W), rows
        along y and columns along x, channel index c * D + d."""
        x = self.conv_input(voxels)
        x = self.encoder_layers(x)
        x = self.conv_out(x)
        # Scatter into a dense (B, D, H, W, C) map ourselves: `SparseConvTensor.dense` indexes with a list,
        # which torch deprecates.
        d, h, w = self.out_shape
        idx = x.indices.long()
        dense = x.features.new_zeros(x.batch_size, d, h, w, x.features.shape[1])
        dense = dense.index_put((idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]), x.features)
        return dense.permute(0, 4, 1, 2, 3).reshape(x.batch_size, -1, h, w)
