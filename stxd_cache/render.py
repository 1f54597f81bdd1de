"""Pictures of cache rows: teacher BEV features as PCA colours, with teacher boxes and GT outlines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
                  min_score: float = 0.3, title: str = "", forward: float | None = None) -> str:
    """Write a PNG of one cache record (`CacheRecord`) on its grid: the BEV as PCA colours in metres (+x right, +y
    up) with the ego, a scale bar, the GT (white) and the teacher boxes scoring at least `min_score` (red); says
    so in the picture when the row holds no such box, and returns that note ("" when boxes are drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.render import GT_COLOUR, bev_panel, save_figure

    count = int(record.count)
    scores = np.asarray(record.scores[:count])
    keep = scores >= min_score
    note = ""
    if count == 0:
        note = "no teacher box in this row"
    elif not keep.any():
        note = f"no teacher box scores >= {min_score:g} (best {scores.max():.2f})"
    groups = [(np.asarray(record.boxes[:count])[keep], "red", f"teacher (score >= {min_score:g}): {int(keep.sum())}")]
    if gt_boxes is not None:
        groups.insert(0, (np.asarray(gt_boxes), GT_COLOUR, f"GT: {len(gt_boxes)}"))
    fig, ax = plt.subplots(figsize=(8, 8))
    extent = (*grid.x_range, *grid.y_range)
    bev_panel(ax, extent=extent, boxes=groups, background=pca_rgb(record.bev), note=note, forward=forward,
              title=title or f"teacher BEV (PCA of {record.bev.shape[0]} channels), {count} cached boxes")
    save_figure(fig, out)
    return note
