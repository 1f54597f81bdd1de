"""Pictures of cache rows: teacher BEV features as PCA colours, with teacher boxes and GT outlines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipelines.boxes import box_corners_bev
from pipelines.grid import BEVGrid


def pca_rgb(bev: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the first three principal components of `bev: (C, H, W)`, robustly scaled."""
    c, h, w = bev.shape
    x = bev.reshape(c, -1).T.astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 4096)], full_matrices=False)
    proj = x @ vt[: min(3, len(vt))].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    return (rgb.reshape(h, w, 3) * 255).astype(np.uint8)


def render_record(record: Any, grid: BEVGrid, out: str | Path, *, gt_boxes: np.ndarray | None = None,
                  min_score: float = 0.3, scale: int = 6) -> None:
    """Write a PNG of one cache record (`CacheRecord`) on its grid, +y up; GT white, teacher red."""
    image = Image.fromarray(pca_rgb(record.bev)).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                                        Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)

    def to_px(xy: np.ndarray) -> list[tuple[float, float]]:
        col_row = grid.world_to_cell(xy)
        return [((c + 0.5) * scale, (grid.shape[0] - 0.5 - r) * scale) for c, r in col_row]

    if gt_boxes is not None and len(gt_boxes):
        for corners in box_corners_bev(gt_boxes):
            draw.polygon(to_px(corners), outline=(255, 255, 255))
    count = int(record.count)
    keep = record.scores[:count] >= min_score
    for box in record.boxes[:count][keep]:
        corners = box_corners_bev(box[None])[0]
        draw.polygon(to_px(corners), outline=(255, 40, 40))
        front = to_px(corners[:2].mean(axis=0, keepdims=True))[0]
        centre = to_px(box[None, :2])[0]
        draw.line([centre, front], fill=(255, 40, 40))
    image.save(out)
