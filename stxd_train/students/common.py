"""What both camera students share: the image encoder, projection of 3D points into the cameras, BEV
alignment across ego motion, and the CenterHead wrapper that makes a student a detector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.grid import BEVGrid
from stxd_cache.teacher.center_head import CenterHead, DecodedBoxes, TaskPreds
from stxd_train.students.fpn import FPN
from stxd_train.students.resnet import ResNet

if TYPE_CHECKING:
    from stxd_train.data import CameraBatch

#: Points closer than this to a camera's image plane (metres) are treated as not seen.
MIN_DEPTH = 0.1


@dataclass(frozen=True)
class StudentOutput:
    """One student forward pass."""

    bev: torch.Tensor
    """(B, C, H, W) BEV features on the student grid (rows along y): what distillation aligns."""
    preds: list[TaskPreds]
    """CenterHead outputs, one `TaskPreds` per task, maps (B, ·, H, W) on the same grid."""


class ImageEncoder(nn.Module):
    """ResNet → FPN: six camera images to `levels` feature maps of `out_channels`."""

    def __init__(self, *, backbone: ResNet, out_channels: int, levels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = FPN(in_channels=backbone.out_channels, out_channels=out_channels, num_outs=levels)
        self.levels = levels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, N, 3, H, W). Returns `levels` maps (B, N, C, H_l, W_l), finest first."""
        b, n = images.shape[:2]
        feats = self.neck(self.backbone(images.flatten(0, 1)))
        return [f.unflatten(0, (b, n)) for f in feats]


def project(points: torch.Tensor, lidar2img: torch.Tensor, image_size: tuple[int, int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project LiDAR-frame points into every camera.

    points: (P, 3) or (B, P, 3); lidar2img: (B, N, 4, 4); image_size: (W, H) in pixels.
    Returns uv (B, N, P, 2) in [0, 1] image fractions (x right, y down), depth (B, N, P) in metres along the
    optical axis, and visible (B, N, P) bool: in front of the camera and inside the image.
    """
    b = lidar2img.shape[0]
    if points.dim() == 2:
        points = points.expand(b, -1, -1)
    homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)          # (B, P, 4)
    cam = torch.einsum("bnij,bpj->bnpi", lidar2img, homo)                          # (B, N, P, 4)
    depth = cam[..., 2]
    uv = cam[..., :2] / depth.clamp(min=MIN_DEPTH)[..., None]
    uv = uv / uv.new_tensor(image_size)
    visible = (depth > MIN_DEPTH) & (uv >= 0).all(-1) & (uv <= 1).all(-1)
    return uv, depth, visible


def bev_points(grid: BEVGrid, heights: Sequence[float], device: torch.device) -> torch.Tensor:
    """(H*W, Z, 3) LiDAR-frame points: every cell centre at every height; cells in row-major order."""
    centres = torch.as_tensor(grid.cell_centers, device=device).flatten(0, 1)     # (HW, 2)
    z = torch.as_tensor(heights, dtype=torch.float32, device=device)
    xy = centres[:, None, :].expand(-1, len(z), -1)
    return torch.cat([xy, z[None, :, None].expand(len(centres), -1, -1)], dim=-1)


def align_bev(prev: torch.Tensor, prev2cur: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """Resample a previous frame's BEV map into the current frame (zeros where it saw nothing).

    prev: (B, C, H, W) on `grid` in the previous LiDAR frame; prev2cur: (B, 4, 4) previous → current LiDAR
    frame. Each current cell centre is moved into the previous frame (the inverse transform, in BEV) and
    `prev` is sampled there bilinearly.
    """
    centres = torch.as_tensor(grid.cell_centers, device=prev.device)                # (H, W, 2)
    cur2prev = torch.linalg.inv(prev2cur.double()).to(prev.dtype)
    rot, trans = cur2prev[:, :2, :2], cur2prev[:, :2, 3]
    xy = torch.einsum("bij,hwj->bhwi", rot, centres) + trans[:, None, None, :]      # (B, H, W, 2)
    lo = xy.new_tensor([grid.x_range[0], grid.y_range[0]])
    hi = xy.new_tensor([grid.x_range[1], grid.y_range[1]])
    norm = (xy - lo) / (hi - lo) * 2 - 1
    return F.grid_sample(prev, norm, mode="bilinear", padding_mode="zeros", align_corners=False)


class CameraStudent(nn.Module):
    """Base of the camera students: a view transform to `bev` (subclasses) and the shared CenterHead."""

    adapter: nn.Module | None
    """A distilled run's adapter, attached by `stxd_train.fit.load_student` (None for a run without one); a student
    being trained has none (the `Distiller` holds it)."""

    def __init__(self, *, image_encoder: ImageEncoder, head: CenterHead, grid: BEVGrid) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.head = head
        self.grid = grid

    @property
    def bev_channels(self) -> int:
        """C of the BEV that `encode_bev` returns, which the head reads and the distillation adapter maps from."""
        return int(self.head.in_channels)

    def encode_bev(self, images: torch.Tensor, lidar2img: torch.Tensor, prev2cur: torch.Tensor,
                   frame_valid: torch.Tensor) -> torch.Tensor:
        """images (B, F, 6, 3, H, W), lidar2img (B, F, 6, 4, 4), prev2cur (B, F, 4, 4), frame_valid (B, F).
        Returns the current frame's BEV (B, C, H_bev, W_bev)."""
        raise NotImplementedError

    def forward(self, batch: CameraBatch) -> StudentOutput:
        bev = self.encode_bev(batch.images, batch.lidar2img, batch.prev2cur, batch.frame_valid)
        return StudentOutput(bev=bev, preds=self.head(bev))

    def loss(self, out: StudentOutput, gt_boxes: Sequence[torch.Tensor],
             gt_labels: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The CenterHead's detection loss terms (`loss_heatmap`, `loss_bbox`) on the student grid."""
        return self.head.loss(out.preds, self.head.build_targets(gt_boxes, gt_labels, self.grid))

    def decode(self, out: StudentOutput) -> list[DecodedBoxes]:
        """Detections per sample in the keyframe LiDAR frame."""
        return self.head.decode(out.preds, self.grid)
