"""Ray casting against oriented boxes and a flat ground: the geometry shared by the synthetic LiDAR
and the camera renderer, so that both sensors see exactly the same world."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.boxes import box_corners


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
    t_enter, t_exit, face, local, _ = ray_solid(origin, dirs, Solid(box[None], np.zeros(1, dtype=bool)))
    return t_enter, t_exit, face, local


@dataclass(frozen=True)
class Solid:
    """An object as the union of upright boxes (its annotation box encloses them; see `shapes`)."""

    parts: np.ndarray    # (K, 9) boxes in the frame of the rays
    cabin: np.ndarray    # (K,) bool: the part that carries windows (vehicles)

    @property
    def bound(self) -> np.ndarray:
        """(1, 9) a box around all parts, 1 µm larger, with the first part's heading."""
        yaw = self.parts[0, 6]
        c, s = np.cos(yaw), np.sin(yaw)
        corners = box_corners(self.parts).reshape(-1, 3)
        along = c * corners[:, 0] + s * corners[:, 1]
        across = -s * corners[:, 0] + c * corners[:, 1]
        lo = np.array([along.min(), across.min(), corners[:, 2].min()]) - 1e-6
        hi = np.array([along.max(), across.max(), corners[:, 2].max()]) + 1e-6
        mid = (lo + hi) / 2
        out = self.parts[:1].copy()
        out[0, :3] = [c * mid[0] - s * mid[1], s * mid[0] + c * mid[1], mid[2]]
        out[0, 3:6] = [hi[1] - lo[1], hi[0] - lo[0], hi[2] - lo[2]]
        return out


def ray_solid(origin: np.ndarray, dirs: np.ndarray, solid: Solid
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays on any part of `solid`: like `ray_box`, plus the index of the hit part (R,)
    (the first of the parts hit at the same distance)."""
    if len(solid.parts) == 1:
        return _nearest_part(origin, dirs, solid.parts)
    # most rays of a sensor's candidate set miss the object: test the parts only on those that meet its bound
    near, far, _, _, _ = _slabs(origin, dirs, solid.bound)
    idx = np.flatnonzero((far[0] >= near[0]) & (far[0] > 1e-6))
    t_enter, t_exit = np.full(len(dirs), np.inf), np.full(len(dirs), np.inf)
    face, local = np.zeros(len(dirs), dtype=np.int8), np.repeat(origin[None].astype(np.float64), len(dirs), 0)
    part = np.zeros(len(dirs), dtype=np.int64)
    t_enter[idx], t_exit[idx], face[idx], local[idx], part[idx] = _nearest_part(origin, dirs[idx], solid.parts)
    return t_enter, t_exit, face, local, part


def _slabs(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where rays enter and leave each of `boxes: (K, >=7)`: near (K, R) and far (K, R) (a hit where
    far >= near), the per-axis entry distances (K, R, 3), and the ray origin (K, 3) and directions
    (K, R, 3) in each box's frame."""
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]          # (K, 1)
    rel = origin - boxes[:, :3]
    o_local = np.stack([c[:, 0] * rel[:, 0] + s[:, 0] * rel[:, 1], -s[:, 0] * rel[:, 0] + c[:, 0] * rel[:, 1],
                        rel[:, 2]], 1)                                              # (K, 3)
    d_local = np.stack([c * dirs[:, 0] + s * dirs[:, 1], -s * dirs[:, 0] + c * dirs[:, 1],
                        np.broadcast_to(dirs[:, 2], (len(boxes), len(dirs)))], 2)  # (K, R, 3)
    half = np.stack([boxes[:, 4], boxes[:, 3], boxes[:, 5]], 1)[:, None, :] / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d_local
        t1 = (-half - o_local[:, None, :]) * inv
        t2 = (half - o_local[:, None, :]) * inv
    # 0 · inf (a ray parallel to a pair of faces, starting in one's plane) is nan: outside that slab
    t1 = np.where(np.isnan(t1), -np.inf, t1)
    t2 = np.where(np.isnan(t2), np.inf, t2)
    entry = np.minimum(t1, t2)
    return entry.max(axis=2), np.maximum(t1, t2).min(axis=2), entry, o_local, d_local


def _nearest_part(origin: np.ndarray, dirs: np.ndarray, parts: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`ray_solid` against `parts: (K, >=7)`, all parts at once."""
    near, far, entry, o_local, d_local = _slabs(origin, dirs, parts)
    near = np.where((far >= near) & (near > 1e-6), near, np.inf)
    part = np.argmin(near, axis=0)                                                  # (R,)
    rays = np.arange(len(dirs))
    t_enter, t_exit = near[part, rays], far[part, rays]
    d_hit = d_local[part, rays]                                                     # (R, 3)
    axis = np.argmax(entry[part, rays], axis=1)
    sign = d_hit[rays, axis] < 0      # entering the + face when moving towards -
    face = (2 * axis + sign).astype(np.int8)
    local = o_local[part] + d_hit * np.where(np.isfinite(t_enter), t_enter, 0.0)[:, None]
    return t_enter, t_exit, face, local, part


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
