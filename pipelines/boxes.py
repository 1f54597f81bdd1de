"""3D boxes in the project's one convention: corners, exact BEV IoU, regression codes, point masks and
conversion to and from devkit `Box` objects in the global frame.

A box array is `(N, 9) [x, y, z, w, l, h, yaw, vx, vy]` in the LiDAR frame of the keyframe: centre, nuScenes
`wlh` size (w across the heading, l along it), yaw about +z (0 along +x, the length axis points along yaw)
and the velocity over ground expressed in the LiDAR axes. Functions that only need the BEV footprint accept
`(N, >=7)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from pipelines import geometry

#: Columns of a box array: x, y, z, w, l, h, yaw, vx, vy.
BOX_DIM = 9
#: Columns of a regression code: x, y, z, log w, log l, log h, sin yaw, cos yaw, vx, vy.
CODE_DIM = 10

# Pairs of IoU are computed in chunks of at most this many so that memory stays bounded (~50 MB).
_IOU_PAIRS_PER_CHUNK = 1 << 14


def _as_boxes(boxes: Any, min_cols: int) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < min_cols:
        raise ValueError(f"expected boxes of shape (N, >={min_cols}), got {arr.shape}")
    return arr


def box_corners_bev(boxes: Any) -> np.ndarray:
    """Footprint corners, counter-clockwise, starting at the front-right corner.

    boxes: (N, >=7) [x, y, z, w, l, h, yaw, ...]. Returns (N, 4, 2) float64 (x, y).
    """
    b = _as_boxes(boxes, 7)
    half_l, half_w = b[:, 4:5] / 2.0, b[:, 3:4] / 2.0
    along = np.array([1.0, 1.0, -1.0, -1.0]) * half_l  # (N, 4) in the box frame
    across = np.array([-1.0, 1.0, 1.0, -1.0]) * half_w
    cos, sin = np.cos(b[:, 6:7]), np.sin(b[:, 6:7])
    xs = b[:, 0:1] + cos * along - sin * across
    ys = b[:, 1:2] + sin * along + cos * across
    return np.stack([xs, ys], axis=-1)


def box_corners(boxes: Any) -> np.ndarray:
    """The 8 corners in the devkit's `Box.corners()` order (the first four face forward).

    boxes: (N, >=7) [x, y, z, w, l, h, yaw, ...]. Returns (N, 8, 3) float64.
    """
    b = _as_boxes(boxes, 7)
    along = np.array([1, 1, 1, 1, -1, -1, -1, -1], dtype=np.float64) * (b[:, 4:5] / 2.0)
    across = np.array([1, -1, -1, 1, 1, -1, -1, 1], dtype=np.float64) * (b[:, 3:4] / 2.0)
    up = np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float64) * (b[:, 5:6] / 2.0)
    cos, sin = np.cos(b[:, 6:7]), np.sin(b[:, 6:7])
    xs = b[:, 0:1] + cos * along - sin * across
    ys = b[:, 1:2] + sin * along + cos * across
    return np.stack([xs, ys, b[:, 2:3] + up], axis=-1)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _inside(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether `points: (..., K, 2)` lie in the footprints of `boxes: (..., 7+)` (broadcast), with a
    small tolerance so that shared corners and collinear edges count as inside."""
    d = points - boxes[..., None, 0:2]
    cos, sin = np.cos(boxes[..., None, 6]), np.sin(boxes[..., None, 6])
    along = d[..., 0] * cos + d[..., 1] * sin
    across = -d[..., 0] * sin + d[..., 1] * cos
    half_l, half_w = boxes[..., None, 4] / 2.0, boxes[..., None, 3] / 2.0
    return (np.abs(along) <= half_l * (1 + 1e-9) + 1e-9) & (np.abs(across) <= half_w * (1 + 1e-9) + 1e-9)


def _intersection_area(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """BEV intersection area of `a: (n, 1, 7+)` and `b: (1, m, 7+)` → (n, m)."""
    ca, cb = box_corners_bev(a.reshape(-1, a.shape[-1])), box_corners_bev(b.reshape(-1, b.shape[-1]))
    ca, cb = ca.reshape(*a.shape[:-1], 4, 2), cb.reshape(*b.shape[:-1], 4, 2)
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    a_in_b = np.broadcast_to(ca, (*shape, 4, 2)), _inside(ca, b)
    b_in_a = np.broadcast_to(cb, (*shape, 4, 2)), _inside(cb, a)

    # Edge i of A against edge j of B: a0 + t·ea = b0 + s·eb with t, s in [0, 1].
    a0, b0 = ca[..., :, None, :], cb[..., None, :, :]
    ea = (np.roll(ca, -1, axis=-2) - ca)[..., :, None, :]
    eb = (np.roll(cb, -1, axis=-2) - cb)[..., None, :, :]
    denom = _cross(ea, eb)
    # Parallel edges yield no crossing; their overlap endpoints are corners already caught by `_inside`.
    parallel = np.abs(denom) <= 1e-12 * np.linalg.norm(ea, axis=-1) * np.linalg.norm(eb, axis=-1)
    safe = np.where(parallel, 1.0, denom)
    t = _cross(b0 - a0, eb) / safe
    s = _cross(b0 - a0, ea) / safe
    eps = 1e-9
    hit = ~parallel & (t >= -eps) & (t <= 1 + eps) & (s >= -eps) & (s <= 1 + eps)
    crossings = (a0 + t[..., None] * ea).reshape(*shape, 16, 2)

    pts = np.concatenate([a_in_b[0], b_in_a[0], crossings], axis=-2)  # (n, m, 24, 2)
    valid = np.concatenate([a_in_b[1], b_in_a[1], hit.reshape(*shape, 16)], axis=-1)
    count = valid.sum(axis=-1, keepdims=True)
    centroid = (pts * valid[..., None]).sum(axis=-2) / np.maximum(count, 1)
    rel = pts - centroid[..., None, :]
    angle = np.where(valid, np.arctan2(rel[..., 1], rel[..., 0]), np.inf)
    order = np.argsort(angle, axis=-1, kind="stable")
    pts = np.take_along_axis(pts, order[..., None], axis=-2)
    valid = np.take_along_axis(valid, order, axis=-1)
    # Invalid candidates collapse onto the first vertex and so add no area to the shoelace sum.
    pts = np.where(valid[..., None], pts, pts[..., :1, :])
    nxt = np.roll(pts, -1, axis=-2)
    area = 0.5 * np.abs(_cross(pts, nxt).sum(axis=-1))
    return np.where(count[..., 0] >= 3, area, 0.0)


def bev_iou(a: Any, b: Any) -> np.ndarray:
    """Exact IoU of the rotated BEV footprints of every pair of boxes.

    a: (N, >=7), b: (M, >=7) [x, y, z, w, l, h, yaw, ...]. Returns (N, M) float64.
    """
    a, b = _as_boxes(a, 7), _as_boxes(b, 7)
    out = np.zeros((len(a), len(b)), dtype=np.float64)
    if out.size == 0:
        return out
    area_a, area_b = a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]
    rows = max(1, _IOU_PAIRS_PER_CHUNK // len(b))
    for start in range(0, len(a), rows):
        chunk = a[start:start + rows]
        inter = _intersection_area(chunk[:, None, :], b[None, :, :])
        union = area_a[start:start + rows, None] + area_b[None, :] - inter
        out[start:start + rows] = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return np.clip(out, 0.0, 1.0)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def encode_boxes(boxes: Any) -> Any:
    """Regression targets of boxes; numpy in → numpy out, torch in → torch out.

    boxes: (..., 9) [x, y, z, w, l, h, yaw, vx, vy].
    Returns (..., 10) [x, y, z, log w, log l, log h, sin yaw, cos yaw, vx, vy].
    """
    if _is_torch(boxes):
        import torch

        cols = [boxes[..., :3], torch.log(boxes[..., 3:6]), torch.sin(boxes[..., 6:7]),
                torch.cos(boxes[..., 6:7]), boxes[..., 7:9]]
        return torch.cat(cols, dim=-1)
    b = np.asarray(boxes)
    cols = [b[..., :3], np.log(b[..., 3:6]), np.sin(b[..., 6:7]), np.cos(b[..., 6:7]), b[..., 7:9]]
    return np.concatenate(cols, axis=-1)


def decode_boxes(codes: Any) -> Any:
    """Boxes from regression codes (the inverse of `encode_boxes`); keeps numpy / torch.

    codes: (..., 10) [x, y, z, log w, log l, log h, sin yaw, cos yaw, vx, vy].
    Returns (..., 9) [x, y, z, w, l, h, yaw, vx, vy].
    """
    if _is_torch(codes):
        import torch

        angle = torch.atan2(codes[..., 6:7], codes[..., 7:8])
        return torch.cat([codes[..., :3], torch.exp(codes[..., 3:6]), angle, codes[..., 8:10]], dim=-1)
    c = np.asarray(codes)
    yaw = np.arctan2(c[..., 6:7], c[..., 7:8])
    return np.concatenate([c[..., :3], np.exp(c[..., 3:6]), yaw, c[..., 8:10]], axis=-1)


def points_in_boxes(points: Any, boxes: Any) -> np.ndarray:
    """Which points lie in which box, with the devkit's inclusive test (`geometry_utils.points_in_box`).

    points: (P, >=3) [x, y, z, ...]; boxes: (N, >=7) [x, y, z, w, l, h, yaw, ...], same frame.
    Returns (N, P) bool.
    """
    pts = np.asarray(points, dtype=np.float64)[:, :3]
    corners = box_corners(boxes)
    # As in the devkit: project onto the edges leaving corner 0 and compare with their squared lengths.
    p1 = corners[:, 0]
    mask = np.ones((len(corners), len(pts)), dtype=bool)
    for other in (4, 1, 3):
        axis = corners[:, other] - p1  # (N, 3)
        proj = axis @ pts.T - np.einsum("nd,nd->n", axis, p1)[:, None]
        mask &= (proj >= 0) & (proj <= np.einsum("nd,nd->n", axis, axis)[:, None])
    return mask


def rotate_velocity(velocity: Any, rotation: np.ndarray) -> np.ndarray:
    """Rotate velocities (no translation), keeping rows with a NaN planar component as NaN.

    velocity: (N, 2) [vx, vy] or (N, 3) [vx, vy, vz]; a missing or NaN vz counts as 0.
    rotation: (3, 3) or (4, 4) (only the rotation part is used). Returns (N, 3) float64.
    """
    v = np.asarray(velocity, dtype=np.float64)
    v3 = np.zeros((len(v), 3))
    v3[:, : min(3, v.shape[1])] = v[:, :3]
    missing = np.isnan(v3[:, :2]).any(axis=1)
    out = np.nan_to_num(v3, nan=0.0) @ np.asarray(rotation, dtype=np.float64)[:3, :3].T
    out[missing] = np.nan
    return out


def _quaternion(rotation: np.ndarray) -> Quaternion:
    # Re-orthonormalise so that float32 round trips of a matrix do not trip pyquaternion's check.
    u, _, vt = np.linalg.svd(rotation[:3, :3])
    return Quaternion(matrix=u @ vt)


def boxes_to_global(
    boxes: Any,
    lidar2ego: np.ndarray,
    ego2global: np.ndarray,
    *,
    labels: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> list[Box]:
    """Devkit boxes in the global frame, e.g. for a nuScenes submission or `DetectionBox`.

    boxes: (N, 9) [x, y, z, w, l, h, yaw, vx, vy] in the LiDAR frame; lidar2ego, ego2global: (4, 4).
    labels, scores, names: optional, N each.
    """
    b = _as_boxes(boxes, BOX_DIM)
    to_global = np.asarray(ego2global, dtype=np.float64) @ np.asarray(lidar2ego, dtype=np.float64)
    centers = geometry.apply(to_global, b[:, :3])
    velocities = rotate_velocity(b[:, 7:9], to_global)
    frame = _quaternion(to_global)
    out = []
    for i in range(len(b)):
        box = Box(
            center=centers[i].tolist(),
            size=b[i, 3:6].tolist(),
            orientation=frame * Quaternion(geometry.quaternion_from_yaw(b[i, 6])),
            velocity=tuple(velocities[i].tolist()),
            label=np.nan if labels is None else int(labels[i]),
            score=np.nan if scores is None else float(scores[i]),
            name=None if names is None else names[i],
        )
        out.append(box)
    return out


def boxes_from_global(
    devkit_boxes: Sequence[Box], lidar2ego: np.ndarray, ego2global: np.ndarray
) -> np.ndarray:
    """Box array in the LiDAR frame from global devkit boxes (the inverse of `boxes_to_global`).

    lidar2ego, ego2global: (4, 4). Returns (N, 9) float32 [x, y, z, w, l, h, yaw, vx, vy]; a box without a
    velocity (NaN) keeps NaN vx, vy.
    """
    if len(devkit_boxes) == 0:
        return np.zeros((0, BOX_DIM), dtype=np.float32)
    to_global = np.asarray(ego2global, dtype=np.float64) @ np.asarray(lidar2ego, dtype=np.float64)
    to_lidar = geometry.invert(to_global)
    centers = np.stack([np.asarray(box.center, dtype=np.float64) for box in devkit_boxes])
    sizes = np.stack([np.asarray(box.wlh, dtype=np.float64) for box in devkit_boxes])
    rotations = np.stack([box.rotation_matrix for box in devkit_boxes])
    velocities = np.stack([np.asarray(box.velocity, dtype=np.float64)[:3] for box in devkit_boxes])
    heading = to_lidar[:3, :3] @ rotations[:, :, 0].T  # each box's x axis in the LiDAR frame, (3, N)
    out = np.empty((len(devkit_boxes), BOX_DIM), dtype=np.float64)
    out[:, :3] = geometry.apply(to_lidar, centers)
    out[:, 3:6] = sizes
    out[:, 6] = np.arctan2(heading[1], heading[0])
    out[:, 7:9] = rotate_velocity(velocities, to_lidar)[:, :2]
    return out.astype(np.float32)
