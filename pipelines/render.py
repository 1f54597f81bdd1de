"""Pictures of boxes: a bird's-eye panel in metres (ego, axes, scale bar) and camera images with projected 3D boxes.

Shared by `stxd-cache show` (teacher boxes on the cached BEV) and `stxd-train show` (a student's boxes on the six
cameras and in BEV). Boxes are `(N, >=7)` in the keyframe LiDAR frame (`pipelines.boxes`); a short line from each
box's centre to the middle of its front face shows the heading.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.boxes import box_corners, box_corners_bev

GT_COLOUR = "white"
#: Edges of the 8 corners of `box_corners` (devkit order: the first four face forward).
_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
#: Smallest depth (m) of a corner drawn in a camera.
_MIN_DEPTH = 0.5


def ego_forward(lidar2ego: np.ndarray) -> float:
    """The ego vehicle's forward direction (its +x) as an angle in the LiDAR frame (nuScenes' LiDAR is turned
    90° on the car: its +y points forward)."""
    forward = np.linalg.inv(np.asarray(lidar2ego, dtype=np.float64))[:3, :3] @ np.array([1.0, 0.0, 0.0])
    return float(np.arctan2(forward[1], forward[0]))


def bev_panel(ax: Any, *, extent: tuple[float, float, float, float], boxes: Sequence[tuple[np.ndarray, str, str]],
              background: np.ndarray | None = None, title: str = "", note: str = "",
              forward: float | None = None) -> None:
    """Draw a bird's-eye panel on the matplotlib axes `ax`.

    extent: (x_min, x_max, y_min, y_max) in metres, +x right and +y up; boxes: (boxes (N, >=7), colour, label)
    groups; background: an (H, W, 3) image covering `extent` (row 0 at y_min); note: a line written in the
    middle of the panel (e.g. that a group has no box); forward: the ego's heading in this frame (`ego_forward`),
    drawn as a triangle at the origin (a dot when unknown).
    """
    x0, x1, y0, y1 = extent
    if background is not None:
        ax.imshow(background, origin="lower", extent=extent, interpolation="nearest")
    else:
        ax.set_facecolor("#202020")
    for group, colour, label in boxes:
        group = np.asarray(group, dtype=np.float64)
        if not group.size:
            continue
        for k, (box, corners) in enumerate(zip(group, box_corners_bev(group), strict=True)):
            closed = np.vstack([corners, corners[:1]])
            ax.plot(closed[:, 0], closed[:, 1], color=colour, linewidth=0.8, label=label if k == 0 else None)
            front = corners[:2].mean(axis=0)
            ax.plot([box[0], front[0]], [box[1], front[1]], color=colour, linewidth=0.8)
    if forward is None:
        ax.plot([0.0], [0.0], "o", color="deepskyblue", zorder=5, label="ego (LiDAR origin)")
    else:   # a triangle at the LiDAR origin pointing where the car drives
        c, s = np.cos(forward), np.sin(forward)
        tri = np.array([[2.5, 0.0], [-1.5, 1.3], [-1.5, -1.3]]) @ np.array([[c, s], [-s, c]])
        ax.fill(tri[:, 0], tri[:, 1], color="deepskyblue", zorder=5, label="ego (pointing forward)")
    scale = 10.0 if (x1 - x0) > 30 else 5.0
    sx, sy = x0 + 0.05 * (x1 - x0), y0 + 0.05 * (y1 - y0)
    ax.plot([sx, sx + scale], [sy, sy], color="yellow", linewidth=3, solid_capstyle="butt", zorder=6)
    ax.text(sx + scale / 2, sy + 0.02 * (y1 - y0), f"{scale:.0f} m", color="yellow", ha="center", va="bottom",
            fontsize=8, zorder=6)
    if note:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.3 * (y1 - y0), note, color="orange", ha="center", va="center",
                fontsize=10, zorder=7, bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"})
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m), LiDAR frame")
    ax.set_ylabel("y (m)")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=7, framealpha=0.6)


def project_edges(boxes: np.ndarray, lidar2img: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """The 12 edges of each box whose both ends lie in front of the camera, as (2, 2) pixel segments of an image of
    `size` (width, height); boxes entirely outside the image are left out."""
    if not len(boxes):
        return []
    corners = box_corners(boxes)                                       # (N, 8, 3)
    homo = np.concatenate([corners, np.ones((*corners.shape[:2], 1))], axis=-1)
    cam = homo @ lidar2img.T                                            # (N, 8, 4)
    depth = cam[..., 2]
    uv = cam[..., :2] / np.maximum(depth, 1e-6)[..., None]
    w, h = size
    segments = []
    for k in range(len(boxes)):
        inside = (depth[k] > _MIN_DEPTH) & (uv[k, :, 0] >= 0) & (uv[k, :, 0] < w) & (uv[k, :, 1] >= 0) \
            & (uv[k, :, 1] < h)
        if not inside.any():
            continue
        segments += [uv[k, [a, b]] for a, b in _EDGES if depth[k, a] > _MIN_DEPTH and depth[k, b] > _MIN_DEPTH]
    return segments


def camera_panel(ax: Any, image: np.ndarray, lidar2img: np.ndarray, boxes: Sequence[tuple[np.ndarray, str]],
                 title: str = "") -> int:
    """Draw an (H, W, 3) image with each (boxes, colour) group projected by `lidar2img` (4, 4, for this image's
    size); returns the number of boxes drawn."""
    h, w = image.shape[:2]
    ax.imshow(image)
    drawn = 0
    for group, colour in boxes:
        group = np.asarray(group, dtype=np.float64)
        for k in range(len(group)):
            segments = project_edges(group[k:k + 1], lidar2img, (w, h))
            drawn += bool(segments)
            for seg in segments:
                ax.plot(seg[:, 0], seg[:, 1], color=colour, linewidth=0.8)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    return drawn


def save_figure(fig: Any, out: str | Path) -> Path:
    """Save `fig` as a PNG at `out` and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
