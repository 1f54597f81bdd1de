"""Foreground maps on a BEV grid, from GT boxes or from the teacher's boxes, to weight the feature terms.

Most BEV cells are empty road; a feature term that weighs every cell alike spends the student's capacity on
imitating the teacher's background. BEVDistill weighs its dense term with a Gaussian foreground map from the
boxes, UniDistill distils features only at points of the boxes, and DistillBEV decomposes the map into
foreground and background regions with separate weights. Here a foreground map `fg` in [0, 1] per cell becomes
the weights `background + (1 − background) · fg` (`cell_weights`).

The Gaussians are CenterPoint's heatmap targets (`CenterHead.build_targets`): radius from
`gaussian_radius(l / cell_y, w / cell_x, overlap)`, floored and at least `min_radius` cells, σ = (2r + 1) / 6,
1.0 at the centre cell, cut to the (2r + 1)² window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipelines.grid import BEVGrid
from stxd_cache.teacher.center_head import gaussian_radius


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] < 7:
        raise ValueError(f"{name} must have the shape (N, >=7) [x, y, z, w, l, h, yaw, ...]; got {tuple(boxes.shape)}")


def _usable(boxes: Tensor) -> Tensor:
    """(N,) bool: a finite centre, size and yaw, and a positive footprint."""
    return torch.isfinite(boxes[:, :7]).all(dim=1) & (boxes[:, 3] > 0) & (boxes[:, 4] > 0)


def footprints(boxes: Tensor, grid: BEVGrid) -> Tensor:
    """(H, W) float 1.0 where a cell centre lies inside the rotated BEV footprint of any box, else 0.0.

    boxes: (N, >=7) [x, y, z, w, l, h, yaw, ...] in the frame of `grid` (the keyframe LiDAR frame); l runs along
    yaw, w across it; boxes without a finite, positive footprint are skipped.
    """
    _check_boxes("boxes", boxes)
    rows, cols = grid.shape
    boxes = boxes[_usable(boxes)].to(torch.float64)
    if not len(boxes):
        return torch.zeros(rows, cols, device=boxes.device)
    xs = grid.x_range[0] + (torch.arange(cols, device=boxes.device, dtype=torch.float64) + 0.5) * grid.cell_size[0]
    ys = grid.y_range[0] + (torch.arange(rows, device=boxes.device, dtype=torch.float64) + 0.5) * grid.cell_size[1]
    dx, dy = xs[None, :] - boxes[:, 0:1], ys[None, :] - boxes[:, 1:2]          # (N, W), (N, H)
    cos, sin = torch.cos(boxes[:, 6:7]), torch.sin(boxes[:, 6:7])
    # The box-frame coordinates of the cell centres are sums of a column part and a row part: (N, H, W) from them.
    along = (dx * cos).float()[:, None, :] + (dy * sin).float()[:, :, None]
    across = (dy * cos).float()[:, :, None] - (dx * sin).float()[:, None, :]
    inside = (along.abs() <= (boxes[:, 4] / 2).float()[:, None, None]) & (
        across.abs() <= (boxes[:, 3] / 2).float()[:, None, None])
    return inside.any(dim=0).to(torch.float32)


def gaussians(boxes: Tensor, peaks: Tensor, grid: BEVGrid, *, gaussian_overlap: float, min_radius: int) -> Tensor:
    """(H, W) float: the largest of each box's CenterPoint Gaussian scaled by its peak value, 0 beyond the windows.

    boxes: (N, >=7) [x, y, z, w, l, h, yaw, ...] in the frame of `grid`; peaks: (N,) the value at each box's centre
    cell (1 for GT boxes, the teacher's score for its boxes); gaussian_overlap, min_radius: as the head's
    `TargetConfig`. Boxes without a finite, positive footprint or with a centre off the grid are skipped.
    """
    _check_boxes("boxes", boxes)
    if tuple(peaks.shape) != (len(boxes),):
        raise ValueError(f"peaks must hold one value per box, ({len(boxes)},); got {tuple(peaks.shape)}")
    rows, cols = grid.shape
    device = boxes.device
    boxes64 = boxes.to(torch.float64)
    centre = torch.floor(grid.world_to_cell(boxes64[:, :2]) + 0.5).long()     # (N, 2) col, row
    keep = (_usable(boxes) & (centre[:, 0] >= 0) & (centre[:, 0] < cols) & (centre[:, 1] >= 0)
            & (centre[:, 1] < rows))
    boxes64, centre, peaks = boxes64[keep], centre[keep], peaks[keep].to(device=device, dtype=torch.float64)
    if not len(boxes64):
        return torch.zeros(rows, cols, device=device)
    cell = grid.cell_size
    radius = gaussian_radius(boxes64[:, 4] / cell[1], boxes64[:, 3] / cell[0], gaussian_overlap)
    radius = radius.floor().clamp(min=min_radius)                             # (N,) cells
    sigma = (2 * radius + 1) / 6
    col = torch.arange(cols, device=device, dtype=torch.float64)
    row = torch.arange(rows, device=device, dtype=torch.float64)
    dc = col[None, :] - centre[:, 0:1]                                        # (N, W)
    dr = row[None, :] - centre[:, 1:2]                                        # (N, H)
    r = radius[:, None]
    gx = torch.where(dc.abs() <= r, torch.exp(-dc**2 / (2 * sigma[:, None] ** 2)), 0.0)
    gy = torch.where(dr.abs() <= r, torch.exp(-dr**2 / (2 * sigma[:, None] ** 2)), 0.0)
    heat = peaks[:, None, None] * gy[:, :, None] * gx[:, None, :]             # (N, H, W), separable
    return heat.amax(dim=0).to(torch.float32)


def gt_foreground(gt_boxes: Sequence[Tensor], grid: BEVGrid, *, gaussian_overlap: float, min_radius: int) -> Tensor:
    """(B, H, W) in [0, 1] on `grid`: 1 inside any GT footprint, and CenterPoint's Gaussian around each GT centre.

    gt_boxes: B tensors (G_i, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame (G_i may be 0). The
    Gaussian dilates each footprint by the head's heatmap radius and gives a box smaller than a cell (a cone on
    1.6 m cells, whose footprint may hold no cell centre) at least its centre cell.
    """
    maps = [torch.maximum(footprints(b, grid), gaussians(b, torch.ones(len(b), device=b.device), grid,
                                                         gaussian_overlap=gaussian_overlap, min_radius=min_radius))
            for b in gt_boxes]
    return torch.stack(maps)


def teacher_foreground(boxes: Tensor, scores: Tensor, valid: Tensor, grid: BEVGrid, *, gaussian_overlap: float,
                       min_radius: int) -> Tensor:
    """(B, H, W) in [0, 1] on `grid`: the teacher's heatmap re-drawn from its boxes, a Gaussian of peak `score`
    around each box centre.

    boxes: (B, M, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame; scores: (B, M) in [0, 1];
    valid: (B, M) bool, False for padding slots. Needs no GT: it marks what the teacher sees, misses included.
    """
    if boxes.dim() != 3 or tuple(scores.shape) != tuple(boxes.shape[:2]) or valid.shape != scores.shape:
        raise ValueError(f"teacher_foreground expects boxes (B, M, 9), scores and valid (B, M); got "
                         f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(valid.shape)}")
    maps = [gaussians(boxes[b][valid[b]], scores[b][valid[b]].clamp(0.0, 1.0), grid,
                      gaussian_overlap=gaussian_overlap, min_radius=min_radius) for b in range(len(boxes))]
    return torch.stack(maps)


def cell_weights(foreground: Tensor, background_weight: float) -> Tensor:
    """Per-cell weights `background_weight + (1 − background_weight) · foreground`: 1 on the foreground,
    `background_weight` far from it, in between on the Gaussian tails. foreground: (B, H, W) in [0, 1]."""
    if not 0.0 <= background_weight <= 1.0:
        raise ValueError(f"background_weight must lie in [0, 1]; got {background_weight}")
    return background_weight + (1.0 - background_weight) * foreground.clamp(0.0, 1.0)
