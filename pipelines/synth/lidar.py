"""A spinning 32-beam LiDAR (HDL-32E-like) ray cast against the boxes and the ground.

Points come out as nuScenes writes them: float32 (x, y, z, intensity, ring) in the sensor frame.
A point on a box is placed 2 cm inside the surface (never further than half the box's depth along the
ray), so that inclusive point-in-box tests count it without ambiguity at the boundary; ground points
get 1 cm of range noise. Ground seen under or between an object's parts (below a trailer, beside a
cyclist's frame) lies at least 1 cm below the ground, so that it falls outside the object's box without
ambiguity: the count of an object's own points is then the devkit's count of points in its box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.boxes import box_corners_bev
from pipelines.synth import ground as ground_mod
from pipelines.synth.raycast import Solid, ray_ground, ray_solid

ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
MAX_RANGE = 70.0

#: Mean LiDAR intensity per detection class label (devkit order).
_CLASS_INTENSITY = np.array([32.0, 28.0, 26.0, 30.0, 24.0, 48.0, 40.0, 14.0, 12.0, 85.0], dtype=np.float32)


@dataclass(frozen=True)
class Beams:
    """Unit ray directions of one revolution in the sensor frame: (32 · A, 3), ring-major."""

    dirs: np.ndarray
    ring: np.ndarray
    azimuth_steps: int

    @staticmethod
    def make(azimuth_steps: int) -> Beams:
        el = np.deg2rad(ELEVATIONS_DEG)
        az = np.arange(azimuth_steps) * (2 * np.pi / azimuth_steps)
        e, a = np.meshgrid(el, az, indexing="ij")
        dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)
        ring = np.repeat(np.arange(len(el)), azimuth_steps)
        return Beams(dirs=dirs, ring=ring, azimuth_steps=azimuth_steps)


def _to_sensor(boxes: np.ndarray, sensor_xy: np.ndarray, sensor_z: float, sensor_yaw: float) -> np.ndarray:
    """Global boxes (N, 9) in the sensor frame (velocities left in global axes: unused here)."""
    c, s = np.cos(sensor_yaw), np.sin(sensor_yaw)
    rel = boxes[:, :2] - sensor_xy
    local = boxes.copy()
    local[:, 0] = c * rel[:, 0] + s * rel[:, 1]
    local[:, 1] = -s * rel[:, 0] + c * rel[:, 1]
    local[:, 2] = boxes[:, 2] - sensor_z
    local[:, 6] = boxes[:, 6] - sensor_yaw
    return local


def scan(beams: Beams, sensor_xy: np.ndarray, sensor_z: float, sensor_yaw: float, boxes: np.ndarray,
         solids: list[Solid], labels: np.ndarray, ground: ground_mod.Ground, rng: np.random.Generator
         ) -> tuple[np.ndarray, np.ndarray]:
    """One revolution.

    Args:
        beams: the ray pattern.
        sensor_xy, sensor_z, sensor_yaw: sensor pose in the global frame (the ground is z = 0).
        boxes: (N, 9) global annotation boxes; solids: the N objects' shapes (global); labels: (N,).
        ground: the scene's ground raster (for intensities).

    Returns:
        points (P, 5) float32 [x, y, z, intensity, ring] in the sensor frame, and
        hit_box (P,) int64: the index into `boxes` that each point lies on, -1 for the ground.
    """
    c, s = np.cos(sensor_yaw), np.sin(sensor_yaw)
    local = _to_sensor(boxes, sensor_xy, sensor_z, sensor_yaw)

    n_az = beams.azimuth_steps
    depth = ray_ground(sensor_z, beams.dirs, MAX_RANGE)
    owner = np.full(len(depth), -1, dtype=np.int64)
    inner = np.zeros(len(depth))
    origin = np.zeros(3)
    shaped: list[tuple[int, np.ndarray]] = []   # objects of several parts, with their candidate rays
    for i, box in enumerate(local):
        dist = np.hypot(box[0], box[1])
        if dist > MAX_RANGE + 8.0:
            continue
        cols = _azimuth_columns(box, n_az)
        idx = (np.arange(len(ELEVATIONS_DEG))[:, None] * n_az + cols[None, :]).ravel()
        parts = Solid(_to_sensor(solids[i].parts, sensor_xy, sensor_z, sensor_yaw), solids[i].cabin)
        t_in, t_out, _, _, _ = ray_solid(origin, beams.dirs[idx], parts)
        closer = t_in < np.minimum(depth[idx], MAX_RANGE)
        sel = idx[closer]
        depth[sel] = t_in[closer]
        owner[sel] = i
        inner[sel] = np.minimum(0.02, 0.5 * (t_out[closer] - t_in[closer]))
        if len(parts.parts) > 1:
            shaped.append((i, idx))
    under = np.zeros(len(depth), dtype=bool)   # ground rays within 10 cm of an object's footprint
    for i, idx in shaped:
        rays = idx[(owner[idx] < 0) & np.isfinite(depth[idx])]
        under[rays] |= _near_footprint(beams.dirs[rays, :2] * depth[rays, None], local[i], 0.1)
    keep = np.isfinite(depth)
    t = depth[keep]
    own = owner[keep]
    on_ground = own < 0
    t = t + np.where(on_ground, rng.normal(0.0, 0.01, size=len(t)), inner[keep])
    sunk = np.flatnonzero(under[keep] & on_ground)
    t[sunk] = np.maximum(t[sunk], (sensor_z + 0.01) / -beams.dirs[keep][sunk, 2])
    xyz = beams.dirs[keep] * t[:, None]
    world_xy = sensor_xy + np.stack([c * xyz[:, 0] - s * xyz[:, 1], s * xyz[:, 0] + c * xyz[:, 1]], 1)
    ground_kind, _ = ground.lookup(world_xy)
    intensity = np.where(on_ground, ground_mod.INTENSITY[ground_kind],
                         _CLASS_INTENSITY[labels[np.maximum(own, 0)]] if len(labels) else 0.0)
    intensity = np.clip(intensity * rng.uniform(0.8, 1.2, size=len(t)) + rng.normal(0, 1.5, len(t)), 0, 255)
    points = np.concatenate([xyz, intensity[:, None], beams.ring[keep, None]], axis=1).astype(np.float32)
    return points, own


def _near_footprint(xy: np.ndarray, box: np.ndarray, margin: float) -> np.ndarray:
    """(M,) whether points `xy: (M, 2)` lie within `margin` m of the footprint of `box` (same frame)."""
    c, s = np.cos(box[6]), np.sin(box[6])
    rel = xy - box[:2]
    return ((np.abs(c * rel[:, 0] + s * rel[:, 1]) <= box[4] / 2 + margin)
            & (np.abs(-s * rel[:, 0] + c * rel[:, 1]) <= box[3] / 2 + margin))


def _azimuth_columns(box: np.ndarray, n_az: int) -> np.ndarray:
    """Azimuth columns whose rays can hit `box` (sensor frame), with wrap-around."""
    xy = box_corners_bev(box[None])[0]
    if np.hypot(box[0], box[1]) < np.hypot(box[3], box[4]) / 2 + 0.5:   # sensor next to the box: all directions
        return np.arange(n_az)
    centre = np.arctan2(box[1], box[0])
    delta = np.angle(np.exp(1j * (np.arctan2(xy[:, 1], xy[:, 0]) - centre)))
    step = 2 * np.pi / n_az
    lo = int(np.floor((centre + delta.min()) / step)) - 1
    hi = int(np.ceil((centre + delta.max()) / step)) + 1
    if hi - lo >= n_az:
        return np.arange(n_az)
    return np.arange(lo, hi + 1) % n_az
