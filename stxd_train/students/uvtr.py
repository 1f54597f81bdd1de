"""A UVTR-style camera student: image features lifted into a voxel grid by a per-pixel depth distribution.

Each pixel predicts a distribution over `D` depth bins. A voxel centre projected into a camera takes the
image feature at its pixel times the probability of its depth there (bilinear in the image, linear between
bins), averaged over the cameras that see it. The voxel layers are then collapsed into the BEV map.

With `sweeps: n > 0` (UVTR-CS) the previous n keyframes are lifted too, at the *current* voxel centres moved
into each previous frame by the ego poses, so their voxels are aligned without resampling; the frames are
fused by a 1×1×1 convolution before the height collapse. Choice: the previous frames are lifted without
gradient (their images go through the same backbone), which keeps the step cost near that of one frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.grid import BEVGrid
from stxd_cache.teacher.center_head import CenterHead
from stxd_train.students.common import CameraStudent, ImageEncoder, bev_points, project


def _conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UVTR(CameraStudent):
    """Depth-weighted voxel lifting → (temporal fusion) → height collapse → BEV convs → CenterHead."""

    voxels: torch.Tensor
    """(H·W·Z, 3) voxel centres of the BEV grid's height layers (a buffer)."""

    def __init__(self, *, image_encoder: ImageEncoder, head: CenterHead, grid: BEVGrid, embed_dims: int,
                 depth_bins: int, depth_range: tuple[float, float], heights: Sequence[float], sweeps: int,
                 bev_convs: int) -> None:
        """
        Args:
            image_encoder: images → feature maps of `embed_dims` channels (the first level is lifted).
            head: the CenterHead on `grid` with `embed_dims` input channels.
            grid: the BEV grid (x, y of the voxels).
            depth_bins, depth_range: D uniform bins between near and far (m).
            heights: z of the voxel layers (LiDAR frame, m).
            sweeps: previous keyframes fused (UVTR-CS); 0 for UVTR-C.
            bev_convs: 3×3 conv layers after the height collapse.
        """
        super().__init__(image_encoder=image_encoder, head=head, grid=grid)
        self.depth_range = (float(depth_range[0]), float(depth_range[1]))
        self.heights = tuple(float(z) for z in heights)
        self.sweeps = sweeps
        self.depth_net = nn.Sequential(_conv_bn(embed_dims, embed_dims, 3), nn.Conv2d(embed_dims, depth_bins, 1))
        self.feat_proj = nn.Conv2d(embed_dims, embed_dims, 1)
        self.temporal_fuse = (nn.Sequential(nn.Conv3d(embed_dims * (sweeps + 1), embed_dims, 1, bias=False),
                                            nn.BatchNorm3d(embed_dims), nn.ReLU(inplace=True)) if sweeps else None)
        self.height_collapse = _conv_bn(embed_dims * len(self.heights), embed_dims, 1)
        self.bev_encoder = nn.Sequential(*(_conv_bn(embed_dims, embed_dims, 3) for _ in range(bev_convs)))
        self.register_buffer("voxels", bev_points(grid, self.heights, torch.device("cpu")).flatten(0, 1),
                             persistent=False)

    def lift(self, images: torch.Tensor, lidar2img: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Voxel features of one frame at `points`.

        images: (B, 6, 3, H, W); lidar2img: (B, 6, 4, 4) of this frame; points: (B, P, 3) in this frame's LiDAR
        frame. Returns (B, C, P).
        """
        b, n = images.shape[:2]
        feat = self.image_encoder(images)[0].flatten(0, 1)                         # (B·N, C, h, w)
        depth = self.depth_net(feat).softmax(1)[:, None]                            # (B·N, 1, D, h, w)
        value = self.feat_proj(feat)
        uv, z, visible = project(points, lidar2img, (images.shape[-1], images.shape[-2]))
        near, far = self.depth_range
        zn = (z - near) / (far - near) * 2 - 1                                      # bin coordinate in [-1, 1]
        grid = (uv * 2 - 1).flatten(0, 1)                                           # (B·N, P, 2)
        sampled = F.grid_sample(value, grid[:, :, None], align_corners=False)[..., 0]            # (B·N, C, P)
        grid3 = torch.cat([grid, zn.flatten(0, 1)[..., None]], -1)[:, :, None, None]             # (B·N, P, 1, 1, 3)
        prob = F.grid_sample(depth, grid3, align_corners=False)[:, :, :, 0, 0]                   # (B·N, 1, P)
        weight = prob * visible.flatten(0, 1)[:, None].to(prob.dtype)
        lifted = (sampled * weight).unflatten(0, (b, n)).sum(1)                     # (B, C, P)
        return lifted / visible.sum(1).clamp(min=1)[:, None].to(lifted.dtype)

    def encode_bev(self, images: torch.Tensor, lidar2img: torch.Tensor, prev2cur: torch.Tensor,
                   frame_valid: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        rows, cols = self.grid.shape
        z = len(self.heights)
        points = self.voxels[None].expand(b, -1, -1)
        vox = [self.lift(images[:, 0], lidar2img[:, 0], points)]
        frames = min(self.sweeps, images.shape[1] - 1)
        for f in range(1, frames + 1):
            cur2prev = torch.linalg.inv(prev2cur[:, f].double()).float()
            moved = points @ cur2prev[:, :3, :3].transpose(1, 2) + cur2prev[:, None, :3, 3]
            with torch.no_grad():
                lifted = self.lift(images[:, f], lidar2img[:, f], moved)
            vox.append(lifted * frame_valid[:, f, None, None].to(lifted.dtype))
        for _ in range(frames, self.sweeps):     # a batch without that many frames: zeros, as a scene start
            vox.append(torch.zeros_like(vox[0]))
        x = torch.cat(vox, 1).view(b, -1, rows, cols, z)                             # (B, C·F, H, W, Z)
        if self.temporal_fuse is not None:
            x = self.temporal_fuse(x)
        x = x.permute(0, 1, 4, 2, 3).reshape(b, -1, rows, cols)                      # (B, C·Z, H, W)
        return self.bev_encoder(self.height_collapse(x))
