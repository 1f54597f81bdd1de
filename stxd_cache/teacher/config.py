"""The teacher's config: one frozen argument group per stage, and `TeacherConfig` that ties them together.

Only independent choices are fields; everything derived (sparse shape, BEV stride, BEV grid, the channels a
stage receives from the previous one) is a property or is computed by `build_teacher`. Load a YAML file with
`pipelines.config.load_config(TeacherConfig, path)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pipelines.classes import DETECTION_CLASSES
from pipelines.config import require
from pipelines.errors import ConfigError
from pipelines.grid import BEVGrid

# Relative tolerance for "the range is a whole number of voxels" and "the stride is an integer".
_RTOL = 1e-6


def _positive_ints(values: Iterable[int]) -> bool:
    return all(isinstance(v, int) and v > 0 for v in values)


def _whole(value: float) -> bool:
    return abs(value - round(value)) <= _RTOL * max(abs(value), 1.0)


@dataclass(frozen=True, kw_only=True)
class VoxelConfig:
    """How points become voxels: the metric range, the voxel size and the capacity limits."""

    point_range: tuple[float, float, float, float, float, float] = field(
        metadata={"help": "[x_min, y_min, z_min, x_max, y_max, z_max] in metres, keyframe LiDAR frame"})
    voxel_size: tuple[float, float, float] = field(metadata={"help": "(x, y, z) voxel size in metres"})
    max_points_per_voxel: int = field(metadata={"help": "points kept per voxel (nuScenes CenterPoint: 10)"})
    max_voxels: int = field(metadata={"help": "voxels kept per sample; extra voxels are dropped"})
    num_point_features: int = field(default=5, metadata={"help": "point columns: x, y, z, intensity, time_lag"})

    def __post_init__(self) -> None:
        lo, hi = self.point_range[:3], self.point_range[3:]
        require("teacher config voxel", [
            (all(a < b for a, b in zip(lo, hi, strict=True)), "point_range", self.point_range,
             "min < max on every axis, e.g. [-54, -54, -5, 54, 54, 3]"),
            (all(v > 0 for v in self.voxel_size), "voxel_size", self.voxel_size, "three sizes > 0 metres"),
            (self.max_points_per_voxel >= 1, "max_points_per_voxel", self.max_points_per_voxel, "at least 1"),
            (self.max_voxels >= 1, "max_voxels", self.max_voxels, "at least 1"),
            (self.num_point_features >= 3, "num_point_features", self.num_point_features, "at least 3 (x, y, z)"),
        ])
        for axis, a, b, size in zip("xyz", lo, hi, self.voxel_size, strict=True):
            if not _whole((b - a) / size):
                raise ConfigError(
                    f"teacher config field `voxel.point_range` spans {b - a:g} m in {axis}, which is "
                    f"{(b - a) / size:.6g} voxels of {size:g} m; expected a whole number: change `point_range` "
                    "or `voxel_size`")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """(X, Y, Z): voxels along each axis."""
        lo, hi = self.point_range[:3], self.point_range[3:]
        return tuple(round((b - a) / s) for a, b, s in zip(lo, hi, self.voxel_size, strict=True))  # type: ignore[return-value]

    @property
    def sparse_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) spatial shape of the sparse tensor; Z has one extra slice, as in mmdet3d (41 for
        -5..3 m at 0.2 m), so that the strided z convolutions give the usual number of BEV heights."""
        x, y, z = self.grid_size
        return z + 1, y, x

    def bev_grid(self, stride: int) -> BEVGrid:
        """The BEV grid of the point range at `stride` voxels per cell."""
        if stride < 1:
            raise ConfigError(f"BEV stride is {stride}; expected a positive integer")
        r = self.point_range
        cell = (self.voxel_size[0] * stride, self.voxel_size[1] * stride)
        return BEVGrid(x_range=(r[0], r[3]), y_range=(r[1], r[4]), cell_size=cell)


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """The SECOND-style sparse 3D encoder (mmdet3d `SparseEncoder`). Every stage boundary is one stride-2
    sparse convolution, so the BEV stride of the encoder is 2 ** (stages - 1)."""

    base_channels: int = field(default=16, metadata={"help": "channels of `conv_input`"})
    encoder_channels: tuple[tuple[int, ...], ...] = field(
        default=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
        metadata={"help": "output channels of every block, one tuple per stage"})
    encoder_paddings: tuple[tuple[int | tuple[int, int, int], ...], ...] = field(
        default=((0, 0, 1), (0, 0, 1), (0, 0, (0, 1, 1)), (0, 0)),
        metadata={"help": "padding of every block, same nesting as `encoder_channels`; only the strided "
                          "convolutions use it, submanifold blocks ignore it"})
    output_channels: int = field(default=128, metadata={"help": "channels of `conv_out` (per BEV height)"})
    block_type: Literal["conv_module", "basicblock"] = field(
        default="basicblock",
        metadata={"help": "`basicblock` (CenterPoint nuScenes): residual blocks, the last block of every stage "
                          "but the last is the strided conv; `conv_module` (SECOND): conv/BN/ReLU blocks, the "
                          "first block of every stage but the first is the strided conv"})

    def __post_init__(self) -> None:
        chans, pads = self.encoder_channels, self.encoder_paddings
        require("teacher config encoder", [
            (self.base_channels > 0, "base_channels", self.base_channels, "a positive integer"),
            (len(chans) >= 1 and all(len(s) >= 1 and _positive_ints(s) for s in chans), "encoder_channels",
             chans, "one non-empty tuple of positive channel counts per stage"),
            (len(pads) == len(chans) and all(len(p) == len(c) for p, c in zip(pads, chans, strict=False)),
             "encoder_paddings", pads, f"the same nesting as encoder_channels {chans}"),
            (self.output_channels > 0, "output_channels", self.output_channels, "a positive integer"),
            (self.block_type in ("conv_module", "basicblock"), "block_type", self.block_type,
             "'conv_module' or 'basicblock'"),
        ])
        if self.block_type == "basicblock":
            previous = self.base_channels
            for i, stage in enumerate(chans):
                strided = len(stage) - 1 if i < len(chans) - 1 else None
                for j, out in enumerate(stage):
                    if j != strided and out != previous:
                        raise ConfigError(
                            f"teacher config field `encoder.encoder_channels`: stage {i + 1} block {j + 1} is a "
                            f"residual basic block from {previous} to {out} channels; expected equal counts "
                            "(e.g. [[16, 16, 32], [32, 32, 64]] from base 16) or `block_type: conv_module`")
                    previous = out

    @property
    def stride(self) -> int:
        """BEV downsampling of the encoder (one stride-2 convolution per stage after the first)."""
        return 2 ** (len(self.encoder_channels) - 1)


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """The SECOND 2D backbone: one block per entry, each a strided conv followed by `layer_nums[i]` convs."""

    layer_nums: tuple[int, ...] = field(default=(5, 5), metadata={"help": "extra 3x3 convs per block"})
    layer_strides: tuple[int, ...] = field(default=(1, 2), metadata={"help": "stride of each block's first conv"})
    out_channels: tuple[int, ...] = field(default=(128, 256), metadata={"help": "channels of each block"})

    def __post_init__(self) -> None:
        n = len(self.layer_nums)
        require("teacher config backbone", [
            (n >= 1 and all(v >= 0 for v in self.layer_nums), "layer_nums", self.layer_nums, "counts >= 0"),
            (len(self.layer_strides) == n and _positive_ints(self.layer_strides), "layer_strides",
             self.layer_strides, f"{n} positive integers (one per block)"),
            (len(self.out_channels) == n and _positive_ints(self.out_channels), "out_channels", self.out_channels,
             f"{n} positive integers (one per block)"),
        ])

    @property
    def block_strides(self) -> tuple[int, ...]:
        """Cumulative stride of each block's output relative to the backbone input."""
        return tuple(math.prod(self.layer_strides[: i + 1]) for i in range(len(self.layer_strides)))


@dataclass(frozen=True, kw_only=True)
class NeckConfig:
    """SECONDFPN: every backbone block is brought to one stride and the results are concatenated."""

    upsample_strides: tuple[float, ...] = field(
        default=(1.0, 2.0), metadata={"help": "per block: >= 1 transposed conv upsampling, < 1 strided conv"})
    out_channels: tuple[int, ...] = field(default=(256, 256), metadata={"help": "channels of each branch"})

    def __post_init__(self) -> None:
        require("teacher config neck", [
            (len(self.upsample_strides) >= 1 and all(s > 0 and (_whole(s) or _whole(1 / s))
                                                      for s in self.upsample_strides),
             "upsample_strides", self.upsample_strides, "positive integers or their inverses, e.g. [0.5, 1, 2]"),
            (len(self.out_channels) == len(self.upsample_strides) and _positive_ints(self.out_channels),
             "out_channels", self.out_channels, "one positive integer per upsample stride"),
        ])


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """The CenterPoint head: a shared conv, then one `SeparateHead` per task (group of classes)."""

    tasks: tuple[tuple[str, ...], ...] = field(metadata={"help": "class names of each task head"})
    share_conv_channels: int = field(default=64, metadata={"help": "channels of the shared 3x3 conv"})
    head_conv_channels: int = field(default=64, metadata={"help": "channels inside every separate head"})
    num_heatmap_convs: int = field(default=2, metadata={"help": "convs of the heatmap branch, final one included"})

    def __post_init__(self) -> None:
        names = [c for task in self.tasks for c in task]
        unknown = sorted(set(names) - set(DETECTION_CLASSES))
        require("teacher config head", [
            (len(self.tasks) >= 1 and all(len(t) >= 1 for t in self.tasks), "tasks", self.tasks,
             "at least one non-empty group of class names"),
            (not unknown, "tasks", unknown, f"class names among {list(DETECTION_CLASSES)}"),
            (len(names) == len(set(names)), "tasks", self.tasks, "every class in at most one task"),
            (self.share_conv_channels > 0, "share_conv_channels", self.share_conv_channels, "a positive integer"),
            (self.head_conv_channels > 0, "head_conv_channels", self.head_conv_channels, "a positive integer"),
            (self.num_heatmap_convs >= 1, "num_heatmap_convs", self.num_heatmap_convs, "at least 1"),
        ])


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """How ground truth becomes heatmaps and regression targets (CenterPoint's `train_cfg`)."""

    gaussian_overlap: float = field(default=0.1, metadata={"help": "CenterNet min IoU that sets the radius"})
    min_radius: int = field(default=2, metadata={"help": "smallest Gaussian radius, in cells"})
    max_objs: int = field(default=500, metadata={"help": "objects per task and sample; extra ones are dropped"})
    code_weights: tuple[float, ...] = field(
        default=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2),
        metadata={"help": "L1 weights of (dx, dy, z, log w, log l, log h, sin, cos, vx, vy)"})

    def __post_init__(self) -> None:
        require("teacher config target", [
            (0.0 < self.gaussian_overlap < 1.0, "gaussian_overlap", self.gaussian_overlap, "in (0, 1)"),
            (self.min_radius >= 0, "min_radius", self.min_radius, "a non-negative integer"),
            (self.max_objs >= 1, "max_objs", self.max_objs, "at least 1"),
            (len(self.code_weights) == 10 and all(w >= 0 for w in self.code_weights), "code_weights",
             self.code_weights, "10 non-negative weights"),
        ])


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Weights of the head's loss terms."""

    heatmap_weight: float = field(default=1.0, metadata={"help": "weight of the Gaussian focal loss"})
    bbox_weight: float = field(default=0.25, metadata={"help": "weight of the L1 box regression loss"})

    def __post_init__(self) -> None:
        require("teacher config loss", [
            (self.heatmap_weight >= 0, "heatmap_weight", self.heatmap_weight, "a weight >= 0"),
            (self.bbox_weight >= 0, "bbox_weight", self.bbox_weight, "a weight >= 0")])


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How head outputs become boxes: top-k per task, score threshold, NMS, then the best `post_max`."""

    score_threshold: float = field(default=0.1, metadata={"help": "boxes below this score are dropped"})
    pre_max_per_task: int = field(default=1000, metadata={"help": "top-k centres per task before NMS"})
    post_max: int = field(default=500, metadata={"help": "boxes kept per sample after NMS, best first"})
    nms: Literal["circle", "rotated"] = field(default="circle", metadata={"help": "`circle` or `rotated`"})
    nms_radius: tuple[float, ...] = field(
        default=(), metadata={"help": "circle NMS: centre distance in metres below which the lower-scored box "
                                      "is removed, one per task"})
    nms_iou: float = field(default=0.2, metadata={"help": "rotated NMS: BEV IoU above which a box is removed"})

    def __post_init__(self) -> None:
        require("teacher config decode", [
            (0.0 <= self.score_threshold < 1.0, "score_threshold", self.score_threshold, "in [0, 1)"),
            (self.pre_max_per_task >= 1, "pre_max_per_task", self.pre_max_per_task, "at least 1"),
            (self.post_max >= 1, "post_max", self.post_max, "at least 1"),
            (self.nms in ("circle", "rotated"), "nms", self.nms, "'circle' or 'rotated'"),
            (all(r >= 0 for r in self.nms_radius), "nms_radius", self.nms_radius, "radii >= 0 metres"),
            (0.0 < self.nms_iou <= 1.0, "nms_iou", self.nms_iou, "in (0, 1]"),
        ])


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """The whole LiDAR teacher; `build_teacher` turns it into a `CenterPoint`."""

    name: str = field(metadata={"help": "a label for logs and caches, e.g. centerpoint_nus"})
    voxel: VoxelConfig = field(metadata={"help": "voxelisation"})
    encoder: EncoderConfig = field(metadata={"help": "sparse 3D encoder"})
    backbone: BackboneConfig = field(metadata={"help": "SECOND 2D backbone"})
    neck: NeckConfig = field(metadata={"help": "SECONDFPN neck"})
    head: HeadConfig = field(metadata={"help": "CenterPoint head"})
    target: TargetConfig = field(default_factory=TargetConfig, metadata={"help": "training targets"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "loss weights"})
    decode: DecodeConfig = field(default_factory=DecodeConfig, metadata={"help": "box decoding and NMS"})
    num_sweeps: int = field(default=10, metadata={"help": "LiDAR frames per sample, the keyframe included"})

    def __post_init__(self) -> None:
        n_blocks, n_tasks = len(self.backbone.layer_nums), len(self.head.tasks)
        require("teacher config teacher", [
            (bool(self.name), "name", self.name, "a non-empty label"),
            (self.num_sweeps >= 1, "num_sweeps", self.num_sweeps, "at least 1"),
            (len(self.neck.upsample_strides) == n_blocks, "neck.upsample_strides", self.neck.upsample_strides,
             f"one per backbone block ({n_blocks})"),
            (self.decode.nms != "circle" or len(self.decode.nms_radius) == n_tasks, "decode.nms_radius",
             self.decode.nms_radius, f"one radius per task ({n_tasks}) for circle NMS"),
        ])
        strides = [b / u for b, u in zip(self.backbone.block_strides, self.neck.upsample_strides, strict=True)]
        if not all(math.isclose(s, strides[0]) for s in strides) or not _whole(strides[0] * self.encoder.stride):
            raise ConfigError(
                f"teacher config: backbone block strides {self.backbone.block_strides} divided by "
                f"`neck.upsample_strides` {self.neck.upsample_strides} give {strides}; expected one common "
                "stride so that the neck branches can be concatenated: change `neck.upsample_strides`")
        self.bev_grid  # noqa: B018 - raises ConfigError when the range is not a whole number of cells

    @property
    def out_stride(self) -> int:
        """Voxels per BEV cell at the head: encoder stride × backbone stride / neck upsampling."""
        stride = self.encoder.stride * self.backbone.block_strides[0] / self.neck.upsample_strides[0]
        return round(stride)

    @property
    def bev_grid(self) -> BEVGrid:
        """The head's BEV grid: the point range at `out_stride`."""
        return self.voxel.bev_grid(self.out_stride)


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Global point-cloud augmentation of teacher training (off at evaluation and extraction)."""

    flip: bool = field(default=True, metadata={"help": "random flips about the x and the y axis"})
    rotation: float = field(default=0.3925, metadata={"help": "max |rotation| about z, rad (π/8)"})
    scale: tuple[float, float] = field(default=(0.95, 1.05), metadata={"help": "global scaling range"})

    def __post_init__(self) -> None:
        require("teacher augment", [
            (self.rotation >= 0, "rotation", self.rotation, ">= 0 (radians)"),
            (0 < self.scale[0] <= self.scale[1], "scale", self.scale, "0 < scale[0] <= scale[1]"),
        ])
