"""The CenterPoint LiDAR teacher and `build_teacher`, the one place where a `TeacherConfig` becomes modules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.errors import ConfigError
from pipelines.grid import BEVGrid
from stxd_cache.teacher.bev_backbone import SECOND, SECONDFPN
from stxd_cache.teacher.center_head import CenterHead, DecodedBoxes, TaskPreds
from stxd_cache.teacher.config import TeacherConfig
from stxd_cache.teacher.sparse_encoder import SparseEncoder, conv_algo
from stxd_cache.teacher.voxelize import Voxelizer


@dataclass(frozen=True)
class TeacherOutput:
    """What one teacher forward pass gives."""

    bev: torch.Tensor
    """(B, C_neck, H, W) neck features on `CenterPoint.bev_grid`: the features the cache stores."""
    preds: list[TaskPreds]
    """Head outputs, one `TaskPreds` per task, maps (B, ·, H, W) on the same grid."""


class CenterPoint(nn.Module):
    """Voxelizer → sparse encoder → SECOND → SECONDFPN → CenterHead, with mmdet3d's attribute names."""

    def __init__(
        self,
        *,
        voxelizer: Voxelizer,
        middle_encoder: SparseEncoder,
        backbone: SECOND,
        neck: SECONDFPN,
        head: CenterHead,
        bev_grid: BEVGrid,
    ) -> None:
        """
        Args:
            voxelizer: points → sparse voxels (no parameters).
            middle_encoder: sparse voxels → BEV map.
            backbone, neck: BEV map → neck features on `bev_grid`.
            head: neck features → per-task maps.
            bev_grid: the grid of the neck features and head maps.
        """
        super().__init__()
        self.voxelizer = voxelizer
        self.middle_encoder = middle_encoder
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self._bev_grid = bev_grid

    @property
    def bev_grid(self) -> BEVGrid:
        """The grid of `TeacherOutput.bev` and of the head maps (the point range at the output stride)."""
        return self._bev_grid

    def forward(self, points: Sequence[torch.Tensor]) -> TeacherOutput:
        """points: B tensors (N_i, 5) [x, y, z, intensity, time_lag] in each sample's keyframe LiDAR frame
        (as from `pipelines.lidar.load_sweeps`), on the model's device."""
        voxels = self.voxelizer(points)
        x = self.middle_encoder(voxels)
        bev = self.neck(self.backbone(x))
        return TeacherOutput(bev=bev, preds=self.head(bev))

    def loss(self, out: TeacherOutput, gt_boxes: Sequence[torch.Tensor],
             gt_labels: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Head losses (`loss_heatmap`, `loss_bbox`, already weighted).

        gt_boxes: B tensors (N_i, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame;
        gt_labels: B tensors (N_i,) int indices into `DETECTION_CLASSES`.
        """
        targets = self.head.build_targets(gt_boxes, gt_labels, self.bev_grid)
        return self.head.loss(out.preds, targets)

    def decode(self, out: TeacherOutput) -> list[DecodedBoxes]:
        """Detections per sample in the keyframe LiDAR frame (see `CenterHead.decode`)."""
        return self.head.decode(out.preds, self.bev_grid)


def build_teacher(cfg: TeacherConfig, device: torch.device | str) -> CenterPoint:
    """The teacher described by `cfg`, on `device`, with spconv algorithms that run there (see
    `sparse_encoder.conv_algo`: Native on CPU). Raises ConfigError if the stages do not fit together."""
    device = torch.device(device)
    voxel = cfg.voxel
    voxelizer = Voxelizer(
        point_range=voxel.point_range, voxel_size=voxel.voxel_size, max_points_per_voxel=voxel.max_points_per_voxel,
        max_voxels=voxel.max_voxels, num_point_features=voxel.num_point_features, sparse_shape=voxel.sparse_shape)
    try:
        encoder = SparseEncoder(
            in_channels=voxel.num_point_features, sparse_shape=voxel.sparse_shape,
            base_channels=cfg.encoder.base_channels, encoder_channels=cfg.encoder.encoder_channels,
            encoder_paddings=cfg.encoder.encoder_paddings, output_channels=cfg.encoder.output_channels,
            block_type=cfg.encoder.block_type, algo=conv_algo(device))
    except ValueError as exc:
        raise ConfigError(f"teacher config {cfg.name!r}: {exc}") from None
    expected = cfg.voxel.bev_grid(cfg.encoder.stride).shape
    if encoder.bev_shape != expected:
        raise ConfigError(
            f"teacher config {cfg.name!r}: the sparse encoder turns sparse shape {voxel.sparse_shape} into a "
            f"{encoder.bev_shape} BEV map, expected {expected} (the range at stride {cfg.encoder.stride}); "
            "change `encoder.encoder_paddings` so that every strided conv halves y and x exactly")
    for stride in cfg.backbone.block_strides:
        if expected[0] % stride or expected[1] % stride:
            raise ConfigError(
                f"teacher config {cfg.name!r}: the {expected} encoder BEV map is not divisible by the backbone "
                f"block stride {stride}; change `backbone.layer_strides` or the point range")
    backbone = SECOND(in_channels=encoder.out_channels, out_channels=cfg.backbone.out_channels,
                      layer_nums=cfg.backbone.layer_nums, layer_strides=cfg.backbone.layer_strides)
    neck = SECONDFPN(in_channels=cfg.backbone.out_channels, out_channels=cfg.neck.out_channels,
                     upsample_strides=cfg.neck.upsample_strides)
    head = CenterHead(
        in_channels=neck.out_channels, tasks=cfg.head.tasks, share_conv_channels=cfg.head.share_conv_channels,
        head_conv_channels=cfg.head.head_conv_channels, num_heatmap_convs=cfg.head.num_heatmap_convs,
        target=cfg.target, loss=cfg.loss, decode=cfg.decode)
    model = CenterPoint(voxelizer=voxelizer, middle_encoder=encoder, backbone=backbone, neck=neck, head=head,
                        bev_grid=cfg.bev_grid)
    return model.to(device)
