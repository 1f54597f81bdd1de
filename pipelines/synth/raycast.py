"""Ray casting against oriented boxes and a flat ground: the geometry shared by the synthetic LiDAR
and the camera renderer, so that both sensors see exactly the same world."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def ray_box(origin: np.ndarray, dirs: np.ndarray, box: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Intersect rays with one box standing upright (rotated about z only).

    Args:
        origin: (3,) ray origin, in the frame of `box`.
        dirs: (R, 3) ray directions (need not be unit length; `t` is in units of `dirs`).
        box: (>=7,) [x, y, z, w, l, h, yaw] in the same frame.

    Returns:
        t_enter (R,) and t_exit (R,) (t_enter = inf where the ray misses or the box is behind);
        face (R,) int8, the entered face: 0/1 = -/+ length axis, 2/3 = -/+ width axis, 4/5 = bottom/top;
        local (R, 3), the entry point in the box frame (x along the length, origin at the centre).
    """
    c, s = np.cos(box[6]), np.sin(box[6])
    rel = origin - box[:3]
    o_local = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
    d_local = np.stack([c * dirs[:, 0] + s * dirs[:, 1], -s * dirs[:, 0] + c * dirs[:, 1], dirs[:, 2]], 1)
    half = np.array([box[4], box[3], box[5]]) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d_local
        t1 = (-half - o_local) * inv
        t2 = (half - o_local) * inv
    t1 = np.nan_to_num(t1, nan=-np.inf)
    t2 = np.nan_to_num(t2, nan=np.inf)
    near = np.minimum(t1, t2)
    far = np.maximum(t1, t2)
    axis = np.argmax(near, axis=1)
    t_enter = near[np.arange(len(near)), axis]
    t_exit = far.min(axis=1)
    hit = (t_exit >= t_enter) & (t_enter > 1e-6)
    t_enter = np.where(hit, t_enter, np.inf)
    sign = d_local[np.arange(len(d_local)), axis] < 0     # entering the + face when moving towards -
    face = (2 * axis + sign).astype(np.int8)
    local = o_local + d_local * np.where(hit, t_enter, 0.0)[:, None]
    return t_enter, t_exit, face, local


@dataclass(frozen=True)
class Solid:
    """An object as the union of upright boxes standing on the ground (its annotation box encloses them)."""

    parts: np.ndarray    # (K, 9) boxes in the frame of the rays
    cabin: np.ndarray    # (K,) bool: the part that carries windows (vehicles)


def ray_solid(origin: np.ndarray, dirs: np.ndarray, solid: Solid
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays on any part of `solid`: like `ray_box`, plus the index of the hit part (R,)."""
    best = None
    for k, part in enumerate(solid.parts):
        hit = ray_box(origin, dirs, part)
        if best is None:
            best = (*hit, np.zeros(len(dirs), dtype=np.int64))
            continue
        closer = hit[0] < best[0]
        best = (np.where(closer, hit[0], best[0]), np.where(closer, hit[1], best[1]),
                np.where(closer, hit[2], best[2]), np.where(closer[:, None], hit[3], best[3]),
                np.where(closer, k, best[4]))
    assert best is not None, "a solid has at least one part"
    return best


def ray_ground(origin_z: float, dirs: np.ndarray, max_t: float = np.inf) -> np.ndarray:
    """(R,) distance along `dirs` to the plane z = 0 from height `origin_z`; inf where none or beyond."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -origin_z / dirs[:, 2]
    return np.where((dirs[:, 2] < 0) & (t <= max_t), t, np.inf)


FACE_NORMALS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=float)


def world_normals(face: np.ndarray, yaw: np.ndarray | float) -> np.ndarray:
    """(R, 3) world-frame normals of the entered `face: (R,)` of boxes with heading `yaw: (R,)` or scalar."""
    n = FACE_NORMALS[face]
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * n[:, 0] - s * n[:, 1], s * n[:, 0] + c * n[:, 1], n[:, 2]], axis=1)
